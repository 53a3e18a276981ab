"""Container start cost: `clave` against `runc` (and `crun` when installed) on the same busybox bundle running
`/bin/true`, interleaved (clave, runc, crun, clave, runc, ...).

1. `RUNTIME run --bundle B ID`: create + start + wait + delete in one command.
2. The sequence containerd's runc.v2 shim drives, each step timed: `create --bundle B --pid-file F ID`,
   `start ID`, `state ID`, wait for the container's exit (this process is a subreaper and reaps the init by
   the pid in the pid file, as the shim does), `delete ID`; with the shim's global flags
   `--root R --log B/log.json --log-format json`.

Every runtime gets the same config.json: `clave spec`'s defaults (no tty, root not read-only), once with its
default seccomp profile and once without (runc's own `runc spec` has no seccomp). State roots and bundles live
under /run (tmpfs). Needs root.

    .venv/bin/python bench/bench_runtime.py [--runs N] [--warmup N] [--runtimes clave,runc,crun]

Prints medians, p90 and min in milliseconds and the ratio of each median to runc's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common import interleave, machine_description, print_ratio_table, run_command_ms, steps_table

from clave.tools.bundles import make_bundle, make_busybox_rootfs

PR_SET_CHILD_SUBREAPER = 36
SHIM_STEPS = ("create", "start", "state", "wait", "delete")


@dataclass
class Runtime:
    name: str
    binary: str
    root: Path
    stderr: IO[str]

    def argv(self, *args: str, log: Path | None = None) -> list[str]:
        """The runtime's command line; with ``log``, the global flags the runc.v2 shim always passes."""
        flags = ["--log", str(log), "--log-format", "json"] if log is not None else []
        return [self.binary, "--root", str(self.root), *flags, *args]

    def call(self, *args: str, log: Path | None = None) -> float:
        return run_command_ms(self.argv(*args, log=log), self.stderr, what=f"{self.name} {' '.join(args)}")

    def container_ids(self) -> list[str]:
        listing = subprocess.run(self.argv("list", "--format", "json"), capture_output=True, text=True, check=True)
        return [entry["id"] for entry in json.loads(listing.stdout or "null") or []]

    def force_delete_all(self) -> None:
        for container_id in self.container_ids():
            subprocess.run(self.argv("delete", "--force", container_id), capture_output=True)


def precompile_clave() -> None:
    """Write clave's bytecode first, as `pip install` does: with PYTHONDONTWRITEBYTECODE set (it is on these
    machines) or after an edit, every `clave` command would otherwise compile changed modules from source."""
    import clave

    package_dir = os.path.dirname(clave.__file__)
    subprocess.run([sys.executable, "-m", "compileall", "-q", package_dir], check=True, stdout=subprocess.DEVNULL)
    print(f"clave bytecode compiled under {package_dir} (python -m compileall)")


def find_runtimes(names: list[str], base: Path) -> list[Runtime]:
    """The requested runtimes that are installed; clave is the console script next to this interpreter."""
    found = []
    for name in names:
        binary = str(Path(sys.executable).parent / "clave") if name == "clave" else shutil.which(name)
        if binary is None or not os.access(binary, os.X_OK):
            print(f"note: {name} not installed, skipped")
            continue
        root = base / "state" / name
        root.mkdir(parents=True)
        found.append(Runtime(name, binary, root, open(base / f"{name}.stderr", "w+")))
    return found


def write_bundles(base: Path) -> dict[str, Path]:
    """Two bundles sharing one busybox rootfs: `clave spec` defaults with and without the seccomp profile."""
    rootfs = make_busybox_rootfs(str(base / "rootfs"))
    bundles = {}
    for variant, keep_seccomp in (("with seccomp", True), ("without seccomp", False)):
        bundle = base / ("bundle-seccomp" if keep_seccomp else "bundle-plain")
        config = make_bundle(str(bundle), ["/bin/true"], rootfs=rootfs)
        if not keep_seccomp:
            del config["linux"]["seccomp"]
            (bundle / "config.json").write_text(json.dumps(config, indent=2))
        elif "seccomp" not in config.get("linux", {}):
            raise RuntimeError("clave spec's default config has no seccomp profile any more: update this bench")
        bundles[variant] = bundle
    return bundles


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def next_id(self, prefix: str) -> str:
        self.value += 1
        return f"{prefix}-{self.value}"


def measure_run(runtime: Runtime, bundle: Path, ids: Counter) -> Callable[[], float]:
    def once() -> float:
        container_id = ids.next_id(f"run-{runtime.name}")
        try:
            return runtime.call("run", "--bundle", str(bundle), container_id)
        finally:
            if (runtime.root / container_id).exists():
                subprocess.run(runtime.argv("delete", "--force", container_id), capture_output=True)
    return once


def usable_runtimes(runtimes: list[Runtime], bundles: dict[str, Path], ids: Counter) -> list[Runtime]:
    """Those that run every bundle; the others are reported and left out (crun 1.8, for one, rejects
    ociVersion 1.2.0 and refuses cgroup v1 "hybrid" hosts)."""
    usable = []
    for runtime in runtimes:
        try:
            for bundle in bundles.values():
                measure_run(runtime, bundle, ids)()
        except RuntimeError as error:
            if runtime.name in ("clave", "runc"):
                raise
            print(f"note: {runtime.name} skipped, it cannot run this config here: {error}")
            continue
        usable.append(runtime)
    return usable


def wait_for_exit(pid: int) -> None:
    """Reap the container's init as the shim does (we are its subreaper); poll if it is not our descendant."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.0005)


def measure_shim_sequence(runtime: Runtime, bundle: Path, ids: Counter) -> Callable[[], dict[str, float]]:
    def once() -> dict[str, float]:
        container_id = ids.next_id(f"shim-{runtime.name}")
        pid_file = bundle / f"{container_id}.pid"
        log = bundle / f"{container_id}.log.json"
        times: dict[str, float] = {}
        try:
            times["create"] = runtime.call("create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                                           container_id, log=log)
            pid = int(pid_file.read_text())
            times["start"] = runtime.call("start", container_id, log=log)
            times["state"] = runtime.call("state", container_id, log=log)
            start = time.perf_counter()
            wait_for_exit(pid)
            times["wait"] = (time.perf_counter() - start) * 1000
            times["delete"] = runtime.call("delete", container_id, log=log)
        finally:
            if (runtime.root / container_id).exists():
                subprocess.run(runtime.argv("delete", "--force", container_id), capture_output=True)
            pid_file.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
        times["total"] = sum(times.values())
        return times
    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="measured runs per runtime and test (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--runtimes", default="clave,runc,crun", help="comma-separated, in interleaving order")
    parser.add_argument("--gap", type=float, default=0.1,
                        help="idle seconds before each measured command (default 0.1; see common.interleave)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_runtime: needs root (containers with namespaces and cgroups)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"bench_runtime: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")

    base = Path(tempfile.mkdtemp(prefix="clave-bench-", dir="/run"))
    runtimes: list[Runtime] = []
    try:
        runtimes = find_runtimes(args.runtimes.split(","), base)
        if not any(r.name == "runc" for r in runtimes):
            sys.exit("bench_runtime: runc is the baseline and is not installed")
        bundles = write_bundles(base)
        precompile_clave()
        print(f"machine: {machine_description()}")
        for runtime in runtimes:
            version = subprocess.run([runtime.binary, "--version"], capture_output=True, text=True).stdout
            print(f"{runtime.name}: {runtime.binary} ({version.splitlines()[0] if version else '?'})")
        print(f"{args.runs} measured runs per runtime after {args.warmup} warm-up rounds, interleaved; "
              f"{args.gap:g} s idle before each; state roots and bundles under {base} (tmpfs); process /bin/true, "
              "no tty")
        ids = Counter()
        runtimes = usable_runtimes(runtimes, bundles, ids)
        for variant, bundle in bundles.items():
            runs = interleave({r.name: measure_run(r, bundle, ids) for r in runtimes}, args.runs, args.warmup,
                              args.gap)
            print_ratio_table(f"`run` (create+start+wait+delete), config {variant}", runs, "runc", label="runtime")
            sequences = interleave({r.name: measure_shim_sequence(r, bundle, ids) for r in runtimes},
                                   args.runs, args.warmup, args.gap)
            steps = {step: {name: [times[step] for times in samples] for name, samples in sequences.items()}
                     for step in (*SHIM_STEPS, "total")}
            print(f"\nshim sequence (--root/--log/--log-format json as the runc.v2 shim), config {variant}")
            print(steps_table(steps, "runc"))
    finally:
        for runtime in runtimes:
            runtime.force_delete_all()
            leftovers = runtime.container_ids()
            runtime.stderr.close()
            if leftovers:
                print(f"warning: {runtime.name} left containers {leftovers} under {runtime.root}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
