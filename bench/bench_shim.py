"""containerd shims compared: Clave's `containerd-shim-clave-v2` against `containerd-shim-runc-v2`, both under
one private containerd (its own config, socket, root and state; CRI disabled) on a busybox rootfs.

1. Latency: `ctr run --rm --runtime R --rootfs ROOTFS ID /bin/true`, the two runtimes interleaved.
2. Memory: N containers (`sleep 300`) started with `ctr run -d` and the annotation io.kubernetes.cri.sandbox-id
   set to one pod id, so both shims serve all N from one process (runc.v2 groups by the same annotation); the
   VmRSS of every shim process of the namespace summed, for N = 1 and N = 10.

    .venv/bin/python bench/bench_shim.py [--runs 20] [--warmup 1] [--sizes 1,10]

Needs root, containerd, ctr and containerd-shim-runc-v2 (Debian package containerd), busybox-static.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from common import interleave, machine_description, print_ratio_table, run_command_ms

from clave.tools.bundles import make_busybox_rootfs

RUNTIMES = {"clave": "io.containerd.clave.v2", "runc": "io.containerd.runc.v2"}
SHIM_BINARIES = {"clave": b"containerd-shim-clave-v2", "runc": b"containerd-shim-runc-v2"}
SANDBOX_ANNOTATION = "io.kubernetes.cri.sandbox-id"


class Containerd:
    """A private containerd and `ctr` against it, in a namespace of its own."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / "containerd.sock")
        self.namespace = f"bench-{uuid.uuid4().hex[:8]}"
        config = base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{base / "root"}"\n'
            f'state = "{base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
        )
        # containerd finds containerd-shim-clave-v2 on its PATH: this interpreter's bin dir first.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        self.log = open(base / "containerd.log", "wb")
        self.process = subprocess.Popen(["containerd", "--config", str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 15
        while self.ctr("version").returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {base / 'containerd.log'}")
            time.sleep(0.1)

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.address, "-n", self.namespace, *args]

    def ctr(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result

    def remove_everything(self) -> None:
        for task in self.ctr("task", "ls", "-q").stdout.split():
            self.ctr("task", "kill", "-s", "SIGKILL", task)
        for task in self.ctr("task", "ls", "-q").stdout.split():
            deadline = time.monotonic() + 10
            while self.ctr("task", "delete", task).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        for container in self.ctr("container", "ls", "-q").stdout.split():
            self.ctr("container", "delete", container)

    def close(self) -> None:
        try:
            self.remove_everything()  # shims outlive containerd: remove containers first
        finally:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
            self.log.close()
            remove_namespace_dirs(self.namespace)


def remove_namespace_dirs(namespace: str) -> None:
    """The directories left for our namespace once its containers are gone: the cgroup parent ctr puts
    containers under (/<namespace>/<id>) in every hierarchy, and the Clave engine's state root."""
    cgroup_root = Path("/sys/fs/cgroup")
    hierarchies = [cgroup_root] if (cgroup_root / "cgroup.controllers").exists() else [
        p for p in cgroup_root.iterdir() if p.is_dir() and not p.is_symlink()]
    state_roots = [Path("/run/containerd/clave") / namespace, Path("/run/containerd/runc") / namespace]
    for directory in [h / namespace for h in hierarchies] + state_roots:
        try:
            directory.rmdir()
        except OSError:
            pass


def shim_pids(namespace: str, binary: bytes) -> list[int]:
    """Shim servers of ``binary`` for ``namespace`` (a Python shim's argv[0] is its interpreter)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(os.path.basename(a) == binary for a in argv[:3]) and namespace.encode() in argv:
            found.append(int(entry.name))
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_latency(containerd: Containerd, rootfs: Path, runs: int, warmup: int) -> dict[str, list[float]]:
    stderr = tempfile.TemporaryFile("w+")

    def run_once(runtime: str) -> float:
        cid = f"lat-{uuid.uuid4().hex[:8]}"
        return run_command_ms(containerd.argv("run", "--rm", "--runtime", runtime, "--rootfs", str(rootfs), cid,
                                              "/bin/true"), stderr, what=f"ctr run --rm --runtime {runtime}")

    variants: dict[str, Callable[[], float]] = {name: partial(run_once, runtime) for name, runtime in RUNTIMES.items()}
    return interleave(variants, runs, warmup)


@contextmanager
def pod(containerd: Containerd, rootfs: Path, runtime: str, size: int) -> Iterator[list[str]]:
    """``size`` sleeping containers annotated as one pod; all removed afterwards."""
    sandbox = f"pod-{uuid.uuid4().hex[:8]}"
    ids = [f"{sandbox}-{i}" for i in range(size)]
    try:
        for cid in ids:
            containerd.ctr("run", "-d", "--runtime", runtime, "--annotation", f"{SANDBOX_ANNOTATION}={sandbox}",
                           "--rootfs", str(rootfs), cid, "/bin/sleep", "300", check=True)
        yield ids
    finally:
        containerd.remove_everything()


def measure_memory(containerd: Containerd, rootfs: Path, sizes: list[int]) -> list[tuple[str, int, int, int]]:
    """(runtime, containers, shim processes, summed VmRSS in KiB) per runtime and size."""
    rows = []
    for size in sizes:
        for name, runtime in RUNTIMES.items():
            with pod(containerd, rootfs, runtime, size):
                time.sleep(0.5)  # let the shims settle after the last start
                pids = shim_pids(containerd.namespace, SHIM_BINARIES[name])
                rows.append((name, size, len(pids), sum(rss_kib(pid) for pid in pids)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sizes", default="1,10", help="containers per pod for the memory measurement")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_shim.py needs root (containerd)")
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install Debian's containerd")
    with tempfile.TemporaryDirectory(prefix="bshim-", dir="/run") as tmp:
        base = Path(tmp)
        rootfs = Path(make_busybox_rootfs(str(base / "rootfs")))
        containerd = Containerd(base)
        try:
            print(machine_description())
            latency = measure_latency(containerd, rootfs, args.runs, args.warmup)
            print_ratio_table(f"ctr run --rm /bin/true, {args.runs} interleaved runs", latency, baseline="runc")
            rows = measure_memory(containerd, rootfs, [int(s) for s in args.sizes.split(",")])
        finally:
            containerd.close()
    print("\nshim memory: VmRSS summed over the shim processes of one pod")
    print(f"{'runtime':<8}  {'containers':>10}  {'shims':>5}  {'RSS KiB':>8}  {'KiB/container':>13}")
    for name, size, shims, rss in rows:
        print(f"{name:<8}  {size:>10}  {shims:>5}  {rss:>8}  {rss / size:>13.0f}")


if __name__ == "__main__":
    main()
