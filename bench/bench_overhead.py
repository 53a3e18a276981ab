"""Per-pod overhead of Clave's handlers, for the RuntimeClasses' `overhead.podFixed` (deploy/runtimeclasses.yaml).

What a pod costs beyond its own containers, with N pods of one container each running side by side on one
private containerd (CRI disabled; `ctr run -d` with io.kubernetes.cri.sandbox-id set, so one shim per pod as
under Kubernetes), native and enclave pods interleaved:

- shim: the PSS (and RSS) of the pod's containerd-shim-clave-v2 server, from /proc/PID/smaps_rollup; PSS splits
  the pages the shims share (the interpreter, the engine's code) among them, which is what N pods really cost;
- enclave runtime: for a WebAssembly enclave container, the PSS of its init (the built-in runtime on wasmtime with
  a guest that only sleeps) minus that of a native `sleep` in the same image, i.e. what the enclave adds;
- vm runtime: for a vm pod (a template's clone, the default), the PSS of the container's keeper and its QEMU
  (guest RAM the guest touched, QEMU itself, TCG's translation cache here);
- CPU: the shim's CPU time while idle over --idle seconds (millicores; for a vm pod with its keeper and QEMU),
  and its CPU time to start the pod.

It prints the medians and a suggested overhead (memory: the median rounded up to MiB plus 25 %; CPU: at least
10m). The pause container a Kubernetes pod also has is not here (ctr runs none): a static pause is ~0.1 MiB.

    .venv/bin/python bench/bench_overhead.py [--pods 5] [--idle 5]

Needs root, containerd and ctr (Debian package containerd), busybox-static, wasmtime.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench_shim import SANDBOX_ANNOTATION, Containerd
from common import machine_description

from clave.tools.bundles import make_busybox_rootfs

RUNTIME = "io.containerd.clave.v2"
SHIM = b"containerd-shim-clave-v2"
SLEEPER_WAT = """(module
 (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
  (i32.store8 (i32.const 8) (i32.const 0))
  (i32.store (i32.const 16) (i32.const 1))
  (i64.store (i32.const 24) (i64.const 3600000000000))
  (loop $forever
   (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
   (br $forever))))"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sleeper_module(rootfs: Path, key: Path) -> None:
    """A signed WASI module that sleeps in poll_oneoff (no CPU burnt), at /app/sleep.wasm in the image."""
    import wasmtime

    from clave.enclave.wasm import signing

    module = rootfs / "app" / "sleep.wasm"
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_bytes(wasmtime.wat2wasm(SLEEPER_WAT))
    signing.generate_key(str(key))
    signing.sign_module(str(module), str(key), None)


def smaps(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Rss"):
            values[name] = int(rest.split()[0])
    return values["Pss"], values["Rss"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def shim_of(container_id: str) -> int:
    """The shim server of the pod of ``container_id``: a fork of `start` (same argv, naming its first container)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(os.path.basename(a) == SHIM for a in argv[:3]) and b"-id" in argv \
                and argv[argv.index(b"-id") + 1] == container_id.encode():
            return int(entry.name)
    raise RuntimeError(f"no shim found for {container_id}")


def task_pid(containerd: Containerd, container_id: str) -> int:
    for line in containerd.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1])
    raise RuntimeError(f"no task {container_id}")


def start_pod(containerd: Containerd, rootfs: Path, kind: str) -> tuple[str, float]:
    """One pod of one container; returns (container id, shim CPU seconds spent starting it)."""
    pod = f"ovh-{kind}-{uuid.uuid4().hex[:8]}"
    cid = f"{pod}-0"
    annotations = ["--annotation", f"{SANDBOX_ANNOTATION}={pod}"]
    if kind == "enclave":
        annotations += ["--annotation", "enclave.type=wasm"]
        command = ["/app/sleep.wasm"]
    elif kind == "vm":
        annotations += ["--annotation", "io.clave.handler=vm"]
        command = ["/bin/sleep", "3600"]
    else:
        command = ["/bin/sleep", "3600"]
    containerd.ctr("run", "-d", "--runtime", RUNTIME, *annotations, "--rootfs", str(rootfs), cid, *command,
                   check=True)
    return cid, cpu_seconds(shim_of(cid))


def vm_processes(keeper: int) -> list[int]:
    """A vm container's host processes: its keeper (the task's pid) and the QEMU it started."""
    children = []
    for task in Path(f"/proc/{keeper}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [keeper, *(c for c in children if Path(f"/proc/{c}/comm").read_text().startswith("qemu"))]


def suggest_memory(kib: float) -> str:
    return f"{math.ceil(kib / 1024 * 1.25)}Mi"


def suggest_cpu(millicores: float) -> str:
    return f"{max(10, math.ceil(millicores))}m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=5, help="pods of each kind running side by side")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds over which idle CPU is measured")
    parser.add_argument("--kinds", default="native,enclave,vm", help="which pods (comma-separated)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_overhead.py needs root (containerd)")
    with tempfile.TemporaryDirectory(prefix="bovh-", dir="/run") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        rootfs = Path(make_busybox_rootfs(str(base / "rootfs")))
        sleeper_module(rootfs, base / "signer.pem")
        containerd = Containerd(base)
        try:
            # warm-up: fill the compiled-module cache, so no pod pays a compile
            cid, _ = start_pod(containerd, rootfs, "enclave")
            containerd.remove_everything()
            pods: dict[str, list[tuple[str, float]]] = {k: [] for k in args.kinds.split(",")}
            if "vm" in pods:  # warm-up: the guest's template, so every vm pod is a clone
                start_pod(containerd, rootfs, "vm")
                containerd.remove_everything()
            for _ in range(args.pods):
                for kind in pods:
                    pods[kind].append(start_pod(containerd, rootfs, kind))
            time.sleep(1.0)  # let the shims settle after the last start
            shims = {kind: [shim_of(cid) for cid, _ in started] for kind, started in pods.items()}
            # the processes a pod costs beyond its app: its shim, and for a vm pod its keeper and QEMU
            extra: dict[str, list[list[int]]] = {kind: [] for kind in pods}
            for kind, started in pods.items():
                for cid, _ in started:
                    extra[kind].append(vm_processes(task_pid(containerd, cid)) if kind == "vm" else [])
            groups = {kind: [[shim, *more] for shim, more in zip(shims[kind], extra[kind], strict=True)]
                      for kind in pods}
            before = {pid: cpu_seconds(pid) for kind in groups for group in groups[kind] for pid in group}
            time.sleep(args.idle)
            idle_mc = {kind: [sum(cpu_seconds(pid) - before[pid] for pid in group) / args.idle * 1000
                              for group in groups[kind]] for kind in groups}
            shim_mem = {kind: [smaps(pid) for pid in pids] for kind, pids in shims.items()}
            init_pss: dict[str, list[float]] = {}
            for kind, started in pods.items():
                if kind == "vm":
                    init_pss[kind] = [sum(smaps(pid)[0] for pid in more) for more in extra[kind]]
                else:
                    init_pss[kind] = [smaps(task_pid(containerd, cid))[0] for cid, _ in started]
        finally:
            containerd.close()
    print(machine_description())
    print(f"{args.pods} pods of each kind side by side, one container each; KiB, medians")
    print(f"\n{'pod':<8}  {'shim PSS':>9}  {'shim RSS':>9}  {'init PSS':>9}  {'runtime PSS':>11}  {'total PSS':>9}  "
          f"{'idle CPU':>8}  {'start CPU':>9}  {'suggested overhead':>20}")
    sleep_pss = statistics.median(init_pss["native"]) if "native" in init_pss else 0.0
    for kind in pods:
        shim_pss = statistics.median(p for p, _ in shim_mem[kind])
        shim_rss = statistics.median(r for _, r in shim_mem[kind])
        init = statistics.median(init_pss[kind])
        runtime = max(init - sleep_pss, 0.0) if kind == "enclave" else init if kind == "vm" else 0.0
        total = shim_pss + runtime
        idle = statistics.median(idle_mc[kind])
        start_cpu = statistics.median(c for _, c in pods[kind]) * 1000
        suggestion = f"memory {suggest_memory(total)}, cpu {suggest_cpu(idle)}"
        print(f"{kind:<8}  {shim_pss:9.0f}  {shim_rss:9.0f}  {init:9.0f}  {runtime:11.0f}  {total:9.0f}  "
              f"{idle:7.1f}m  {start_cpu:7.0f}ms  {suggestion:>20}")
    print("\ninit PSS: the container's first process (native: the app, `sleep`; enclave: the wasm runtime and guest;"
          "\nvm: its keeper and QEMU); runtime PSS = enclave init - native init, or a vm's keeper + QEMU;"
          "\ntotal = shim + runtime; idle CPU in millicores over "
          f"{args.idle:g} s; start CPU: the shim's CPU time up to the running pod.")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
