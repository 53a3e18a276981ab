"""VM sandboxes: a bare QEMU boot of the guest kernel to its first userspace line, a boot to the agent ready,
and a busybox container run through the agent (boot included), interleaved; plus QEMU's memory.

    .venv/bin/python bench/bench_vm.py [--runs N] [--warmup N] [--memory-mib M]

- bare: QEMU with the guest's kernel and initramfs only (no disks, no agent port), until the stage-1 init's
  first console line; the same machine, accelerator and kernel command line as the VMs below.
- agent: Vm.create + start (QEMU spawned, kernel, stage 2, Python agent answering Health.Check).
- container: agent, then CreateContainer (rootfs: an ext4 image of the busybox rootfs on virtio-blk),
  AttachIO, StartContainer of /bin/true and WaitProcess; "in-guest" is the container part alone.
- memory: QEMU's RSS and PSS (/proc/PID/smaps_rollup) once a container has run, beside the guest RAM size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from common import interleave, machine_description, print_ratio_table, summarize  # noqa: E402

from clave.config.defaults import default_spec  # noqa: E402
from clave.tools.bundles import make_busybox_rootfs  # noqa: E402
from clave.vm.client import blk_storage  # noqa: E402
from clave.vm.guest import MARK_INIT, Guest, build_guest  # noqa: E402
from clave.vm.qemu import Disk, Vm, VmConfig  # noqa: E402

MOUNT = "/run/clave-agent/mounts/rootfs"


def bare_boot_ms(guest: Guest, work: str, memory: int) -> float:
    state = tempfile.mkdtemp(dir=work)
    os.rmdir(state)
    vm = Vm.create(VmConfig(state, guest, memory_mib=memory))
    full = vm.command(vm.config.accel or _accel(guest))
    # keep the machine and the kernel, drop every device after the console (QMP, agent port, rng, disks)
    cmd = full[: full.index("-qmp")]
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marker = MARK_INIT.encode()
        while marker not in vm._console_bytes():
            if proc.poll() is not None or time.perf_counter() - t0 > 60:
                raise SystemExit(f"bare boot failed: {vm.console_tail()}")
            time.sleep(0.005)
        elapsed = (time.perf_counter() - t0) * 1000
        proc.kill()
        proc.wait()
        return elapsed
    finally:
        vm.destroy()


def _accel(guest: Guest) -> str:
    from clave.vm.accel import acceleration

    return acceleration(guest).accel


class Booted:
    def __init__(self) -> None:
        self.agent_ms = 0.0
        self.container_ms = 0.0
        self.in_guest_ms = 0.0
        self.rss_mib = 0.0
        self.pss_mib = 0.0


def boot(guest: Guest, work: str, memory: int, image: str | None, run_container: bool) -> Booted:
    state = tempfile.mkdtemp(dir=work)
    os.rmdir(state)
    disks = []
    if image is not None:
        copy = os.path.join(work, f"rootfs-{os.path.basename(state)}.img")
        shutil.copyfile(image, copy)
        disks.append(Disk(copy, "rootfs"))
    out = Booted()
    t0 = time.perf_counter()
    vm = Vm.create(VmConfig(state, guest, memory_mib=memory, disks=disks))
    try:
        vm.start()
        out.agent_ms = (time.perf_counter() - t0) * 1000
        if run_container:
            agent = vm.agent()
            config = default_spec()
            config["process"].update({"args": ["/bin/true"], "terminal": False})
            config["root"] = {"path": MOUNT, "readonly": False}
            t1 = time.perf_counter()
            agent.create_container("bench", config, [blk_storage("rootfs", MOUNT)])
            io = agent.attach_io("bench")
            agent.start_container("bench")
            status = agent.wait_process("bench", timeout=60)
            io.join(10)
            done = time.perf_counter()
            if status != 0:
                raise SystemExit(f"container exited with {status}")
            out.container_ms = (done - t0) * 1000
            out.in_guest_ms = (done - t1) * 1000
            out.rss_mib, out.pss_mib = _memory(vm.pid)
            agent.remove_container("bench")
        return out
    finally:
        vm.destroy()
        for disk in disks:
            os.unlink(disk.path)


def _memory(pid: int) -> tuple[float, float]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss / 1024, pss / 1024


def templates(argv: list[str]) -> None:
    """``bench_vm.py templates [--runs N] [--warmup N] [--clones N] [--memory-mib M]``: a VM from a template
    (clave.vm.template) against a boot, interleaved: Vm.create + start to agent ready, and a busybox /bin/true
    container including that start; then QEMU's PSS per VM with N clones running against N booted VMs."""
    parser = argparse.ArgumentParser(prog="bench_vm.py templates")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--memory-mib", type=int, default=256)
    args = parser.parse_args(argv)
    guest = build_guest()
    work = tempfile.mkdtemp(prefix="bvt-", dir="/tmp")
    try:
        tree = os.path.join(work, "tree")
        make_busybox_rootfs(tree)
        image = os.path.join(work, "rootfs.img")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, image, "32M"], check=True, capture_output=True)

        def start(template: bool, container: bool) -> float:
            state = tempfile.mkdtemp(dir=work)
            os.rmdir(state)
            copy = os.path.join(work, f"rootfs-{os.path.basename(state)}.img")
            shutil.copyfile(image, copy)
            t0 = time.perf_counter()
            vm = Vm.create(VmConfig(state, guest, memory_mib=args.memory_mib, disks=[Disk(copy, "rootfs")],
                                    template=template))
            try:
                vm.start()
                if container:
                    agent = vm.agent()
                    config = default_spec()
                    config["process"].update({"args": ["/bin/true"], "terminal": False})
                    config["root"] = {"path": MOUNT, "readonly": False}
                    agent.create_container("bench", config, [blk_storage("rootfs", MOUNT)])
                    io = agent.attach_io("bench")
                    agent.start_container("bench")
                    if agent.wait_process("bench", timeout=60) != 0:
                        raise SystemExit("container failed")
                    io.join(10)
                return (time.perf_counter() - t0) * 1000
            finally:
                vm.destroy()
                os.unlink(copy)

        start(True, False)  # the template exists before the clock starts
        samples = interleave({
            "boot: agent ready": lambda: start(False, False),
            "clone: agent ready": lambda: start(True, False),
            "boot: container /bin/true": lambda: start(False, True),
            "clone: container /bin/true": lambda: start(True, True),
        }, runs=args.runs, warmup=args.warmup)
        print(f"# bench_vm templates: {machine_description()}")
        print(f"# accel {_accel(guest)}, -m {args.memory_mib}, microvm, {args.runs} runs after {args.warmup} warm-up")
        print_ratio_table("VM start (Vm.create + start, agent ready)",
                          {k: v for k, v in samples.items() if "agent" in k}, baseline="boot: agent ready")
        print_ratio_table("busybox /bin/true container (VM start included)",
                          {k: v for k, v in samples.items() if "container" in k}, baseline="boot: container /bin/true")
        for template in (True, False):
            vms = []
            try:
                for i in range(args.clones):
                    state = os.path.join(work, f"{'c' if template else 'b'}{i}")
                    vm = Vm.create(VmConfig(state, guest, memory_mib=args.memory_mib, template=template))
                    vms.append(vm)
                    vm.start()
                pss = [_memory(vm.pid)[1] for vm in vms]
                print(f"\n{args.clones} {'clones' if template else 'booted VMs'} running: PSS per VM median "
                      f"{summarize(pss).median:.0f} MiB, total {sum(pss):.0f} MiB")
            finally:
                for vm in vms:
                    vm.destroy()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-mib", type=int, default=256)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_vm.py needs root")
    guest = build_guest()
    accel = _accel(guest)
    work = tempfile.mkdtemp(prefix="bvm-", dir="/tmp")
    try:
        tree = os.path.join(work, "tree")
        make_busybox_rootfs(tree)
        image = os.path.join(work, "rootfs.img")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, image, "32M"], check=True, capture_output=True)
        containers: list[Booted] = []

        def container() -> float:
            result = boot(guest, work, args.memory_mib, image, True)
            containers.append(result)
            return result.container_ms

        samples = interleave({
            "bare boot (first userspace line)": lambda: bare_boot_ms(guest, work, args.memory_mib),
            "boot to agent ready": lambda: boot(guest, work, args.memory_mib, None, False).agent_ms,
            "container /bin/true (boot included)": container,
        }, runs=args.runs, warmup=args.warmup)
        measured = containers[args.warmup:]
        print(f"# bench_vm: {machine_description()}")
        print(f"# accel {accel}, guest {guest.kernel_release}, -m {args.memory_mib}, microvm, 1 vCPU, "
              f"{args.runs} runs after {args.warmup} warm-up")
        print_ratio_table("time from spawning QEMU", samples, baseline="bare boot (first userspace line)")
        print_ratio_table("container part alone (create + attach + start + wait, in a booted VM)",
                          {"in-guest": [c.in_guest_ms for c in measured]})
        rss = summarize([c.rss_mib for c in measured]).median
        pss = summarize([c.pss_mib for c in measured]).median
        print(f"\nQEMU memory after one container (median): RSS {rss:.0f} MiB, PSS {pss:.0f} MiB "
              f"(guest RAM {args.memory_mib} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["templates"]:
        templates(sys.argv[2:])
    else:
        main()
