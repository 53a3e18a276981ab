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
    parser.add_argument("--paths", default="", help="only these caller-path sections: start,memory,io (see below)")
    parser.add_argument("--path-runs", type=int, default=3, help="interleaved runs of --paths start and io")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_vm.py needs root")
    guest = build_guest()
    if args.paths:
        paths_main(args, guest)
        return
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


# -- the paths a caller takes: `clave --handler vm run`, `ctr run` through the clave shim, memory per VM, IO --------
#
#     .venv/bin/python bench/bench_vm.py --paths start,memory,io [--path-runs 3]
#
# With --paths, only these sections run (the VM-internals section above is skipped).
# - start: `clave --handler vm run --bundle B ID` of /bin/true, `ctr run --rm --runtime io.containerd.clave.v2
#   --annotation io.clave.handler=vm` through a private containerd (bench_shim's), `clave --handler vm run` of a bundle
#   annotated io.clave.vm.template=false (a boot, not a template's clone), a native `clave run`, and
#   bare_boot_ms() above (same kernel, machine and -m as the handler's default VM), interleaved; ratio to the bare
#   boot (issue 13's goal: a vm container's start <= 1.2x the bare boot).
# - memory: 1 and 5 running vm containers (`clave --handler vm create` + `start` of `sleep`), clones and booted;
#   per VM the RSS and PSS (/proc/PID/smaps_rollup) of QEMU, of the keeper (the container's pid in `clave state`)
#   and of any other child of the keeper; QEMU's guest-RAM mapping and TCG's translation cache are split out, so
#   what is beyond guest RAM shows. Against Kata's QEMU RuntimeClass overhead of 160 MiB.
# - io: inside a vm container and inside the same bundle run by runc on the host, a file in the container's rootfs
#   (vm: the qcow2 layer over the cached ext4 base on virtio-blk) and in a bind-mounted host directory (vm:
#   virtio-fs): sequential write (busybox dd bs=1M conv=fsync; and with oflag=direct, which leaves out the guest's
#   page-cache copy: under TCG the guest's memcpy is emulated, ~90 MB/s here), sequential read (dd iflag=direct, or
#   after the guest drops its caches where O_DIRECT is refused) and random 4 KiB reads (O_DIRECT pread at seeded random
#   offsets, by a small static helper compiled here: busybox has no random-offset reader and no sub-second clock).
#   9p is not measured: Debian's cloud kernel, the guest's, has no 9p.

from common import run_command_ms, steps_table  # noqa: E402

PATH_SECTIONS = ("start", "memory", "io")
TEMPLATE_RAM_FILES: set[str] = set()  # the template RAM files clones were seen mapping (memory_section)
GUEST_RAM_MIB = 256  # the handler's default VM: clave.vm.qemu.DEFAULT_MEMORY_MIB, no memory limit in the config
KATA_QEMU_OVERHEAD_MIB = 160  # Kata's RuntimeClass kata-qemu: overhead.podFixed.memory
IO_FILE_MIB = 64
IO_RANDOM_READS = 2048

IOHELPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "clock") == 0) {
        printf("%lld\n", now_ns());
        return 0;
    }
    if (argc != 4 || strcmp(argv[1], "randread") != 0) {
        fprintf(stderr, "usage: iohelper clock | iohelper randread FILE COUNT\n");
        return 2;
    }
    const char *mode = "direct";
    int fd = open(argv[2], O_RDONLY | O_DIRECT);
    if (fd < 0 && errno == EINVAL) {
        mode = "buffered";
        fd = open(argv[2], O_RDONLY);
    }
    if (fd < 0) { perror(argv[2]); return 1; }
    struct stat st;
    fstat(fd, &st);
    long blocks = st.st_size / 4096, count = atol(argv[3]);
    void *buf;
    if (blocks <= 0 || posix_memalign(&buf, 4096, 4096)) return 1;
    unsigned long long x = 88172645463325252ULL; /* xorshift64, the same offsets on every run */
    long long t0 = now_ns();
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buf, 4096, (off_t)(x % blocks) * 4096) != 4096) { perror("pread"); return 1; }
    }
    printf("%lld %s\n", now_ns() - t0, mode);
    return 0;
}
"""

# Run in the container: for each place, a line "<place> <measure> <ns> <how>".
IO_SCRIPT = r"""
set -e
MIB=$1; COUNT=$2
seqread() {
  if dd if="$1" of=/dev/null bs=1M iflag=direct 2>/dev/null; then echo direct; return; fi
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then dd if="$1" of=/dev/null bs=1M 2>/dev/null; echo dropped
  else dd if="$1" of=/dev/null bs=1M 2>/dev/null; echo cached; fi
}
for place in rootfs:/root/iobench volume:/data/iobench; do
  name=${place%%:*}; f=${place#*:}
  t0=$(iohelper clock); dd if=/dev/zero of="$f" bs=1M count="$MIB" conv=fsync 2>/dev/null; t1=$(iohelper clock)
  echo "$name seqwrite $((t1 - t0)) fsync"
  t0=$(iohelper clock)
  if dd if=/dev/zero of="$f.direct" bs=1M count="$MIB" oflag=direct conv=fsync 2>/dev/null; then how=direct
  else how=refused; fi
  t1=$(iohelper clock); rm -f "$f.direct"
  [ $how = direct ] && echo "$name seqwrite-direct $((t1 - t0)) $how" || echo "$name seqwrite-direct 0 $how"
  t0=$(iohelper clock); how=$(seqread "$f"); t1=$(iohelper clock)
  echo "$name seqread $((t1 - t0)) $how"
  r=$(iohelper randread "$f" "$COUNT")
  echo "$name randread $r"
  rm -f "$f"
done
"""


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


class PathBench:
    """Bundles, state roots and a private containerd for the path sections; everything under ``work``."""

    def __init__(self, work: str) -> None:
        from clave.tools.bundles import make_bundle

        self.work = work
        self.clave = os.path.join(os.path.dirname(sys.executable), "clave")
        self.root = os.path.join(work, "root-clave")
        self.runc_root = os.path.join(work, "root-runc")
        self.rootfs = make_busybox_rootfs(os.path.join(work, "rootfs"))
        self.true_bundle = os.path.join(work, "bundle-true")
        make_bundle(self.true_bundle, ["/bin/true"], rootfs=self.rootfs)
        self.sleep_bundle = os.path.join(work, "bundle-sleep")
        make_bundle(self.sleep_bundle, ["/bin/sleep", "600"], rootfs=self.rootfs)
        # the same, but booting: the annotation refuses a template's clone (docs/vm.md)
        no_template = {"annotations": {"io.clave.vm.template": "false"}}
        self.true_boot_bundle = os.path.join(work, "bundle-true-boot")
        make_bundle(self.true_boot_bundle, ["/bin/true"], rootfs=self.rootfs, **no_template)
        self.sleep_boot_bundle = os.path.join(work, "bundle-sleep-boot")
        make_bundle(self.sleep_boot_bundle, ["/bin/sleep", "600"], rootfs=self.rootfs, **no_template)
        self.stderr = open(os.path.join(work, "stderr"), "w+")
        self.counter = 0
        self.containerd = None

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"bvm-{prefix}-{os.getpid()}-{self.counter}"

    def clave_argv(self, *args: str, vm: bool = True) -> list[str]:
        return [self.clave, "--root", self.root, *(["--handler", "vm"] if vm else []), *args]

    def delete(self, container_id: str) -> None:
        if os.path.exists(os.path.join(self.root, container_id)):
            subprocess.run(self.clave_argv("delete", "--force", container_id, vm=False), capture_output=True)

    def close(self) -> None:
        if os.path.isdir(self.root):
            for container_id in os.listdir(self.root):
                self.delete(container_id)
        if self.containerd is not None:
            self.containerd.close()  # removes its tasks first, then stops containerd (its pid)
        self.stderr.close()


def clave_run_ms(bench: PathBench, vm: bool, boot: bool = False) -> float:
    container_id = bench.next_id("vm" if vm else "native")
    bundle = bench.true_boot_bundle if boot else bench.true_bundle
    try:
        return run_command_ms(bench.clave_argv("run", "--bundle", bundle, container_id, vm=vm),
                              bench.stderr, what=f"clave {'--handler vm ' if vm else ''}run")
    finally:
        bench.delete(container_id)


def ctr_run_ms(bench: PathBench) -> float:
    from pathlib import Path

    from bench_shim import Containerd

    if bench.containerd is None:
        bench.containerd = Containerd(Path(bench.work))
    argv = bench.containerd.argv("run", "--rm", "--runtime", "io.containerd.clave.v2", "--annotation",
                                 "io.clave.handler=vm", "--rootfs", bench.rootfs, bench.next_id("ctr"), "/bin/true")
    return run_command_ms(argv, bench.stderr, what="ctr run --rm (clave shim, vm)")


def start_section(bench: PathBench, guest: Guest, runs: int, warmup: int) -> dict[str, list[float]]:
    from functools import partial

    print(f"\n## start: {runs} interleaved runs after {warmup} warm-up; {_load_note()}")
    samples = interleave({
        "bare QEMU boot (first userspace line)": lambda: bare_boot_ms(guest, bench.work, GUEST_RAM_MIB),
        "clave --handler vm run /bin/true": partial(clave_run_ms, bench, True),
        "the same, booting (template=false)": partial(clave_run_ms, bench, True, True),
        "ctr run --rm, clave shim, vm": partial(ctr_run_ms, bench),
        "clave run /bin/true (native)": partial(clave_run_ms, bench, False),
    }, runs=runs, warmup=warmup)
    print_ratio_table(f"time to container finished (the command's wall clock); after: {_load_note()}", samples,
                      baseline="bare QEMU boot (first userspace line)")
    notes = {line.strip() for line in open(bench.stderr.name) if "template" in line}
    for line in sorted(notes):
        print(f"note from the last run: {line}")
    return samples


def _rollup_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def _qemu_parts_kib(qemu_pid: int, ram_mib: int) -> dict[str, list[int]]:
    """[Rss, Pss] of QEMU's guest-RAM mapping (the one mapping of exactly the guest's size) and of TCG's
    translation cache (its anonymous rwx mapping; none under KVM)."""
    parts = {"ram": [0, 0], "tcg": [0, 0]}
    current: list[int] | None = None
    executable_anon = False
    header: list[str] = []
    with open(f"/proc/{qemu_pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not line[0].isupper():  # a new mapping's header
                current = None
                header = fields
                executable_anon = len(fields) == 5 and fields[1] == "rwxp" and fields[4] == "0"
            elif fields[0] == "Size:":
                if int(fields[1]) == ram_mib * 1024:
                    current = parts["ram"]
                    if len(header) > 5:  # a template's clone: the template's RAM file, mapped copy-on-write
                        TEMPLATE_RAM_FILES.add(header[5])
                elif executable_anon:
                    current = parts["tcg"]
            elif current is not None and fields[0] in ("Rss:", "Pss:"):
                current[0 if fields[0] == "Rss:" else 1] += int(fields[1])
    return parts


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


class VmMemory:
    """One running vm container's host processes, in KiB."""

    def __init__(self, keeper: int) -> None:
        self.keeper_rss, self.keeper_pss = _rollup_kib(keeper)
        self.qemu_rss = self.qemu_pss = self.ram_rss = self.ram_pss = self.other_rss = self.other_pss = 0
        self.tcg_rss = self.tcg_pss = 0
        for child in _children(keeper):
            rss, pss = _rollup_kib(child)
            if _comm(child).startswith("qemu"):
                self.qemu_rss, self.qemu_pss = rss, pss
                parts = _qemu_parts_kib(child, GUEST_RAM_MIB)
                (self.ram_rss, self.ram_pss), (self.tcg_rss, self.tcg_pss) = parts["ram"], parts["tcg"]
            else:
                self.other_rss += rss
                self.other_pss += pss
        if not self.qemu_rss:
            raise RuntimeError(f"no QEMU child of the keeper {keeper}")


def memory_section(bench: PathBench, sizes: list[int]) -> dict[str, list[VmMemory]]:
    import json

    print(f"\n## memory: {' and '.join(map(str, sizes))} running vm containers (sleep), guest RAM {GUEST_RAM_MIB} MiB "
          f"each, template clones (the default) and booted (io.clave.vm.template=false); {_load_note()}")
    results: dict[str, list[VmMemory]] = {}
    for size, mode in [(size, mode) for mode in ("clone", "boot") for size in sizes]:
        bundle = bench.sleep_bundle if mode == "clone" else bench.sleep_boot_bundle
        ids = [bench.next_id(f"mem{size}") for _ in range(size)]
        try:
            for container_id in ids:
                run_command_ms(bench.clave_argv("create", "--bundle", bundle, container_id), bench.stderr,
                               what="clave --handler vm create")
                run_command_ms(bench.clave_argv("start", container_id), bench.stderr, what="clave start")
            time.sleep(3)  # the last guest settles after its start
            results[f"{size} {mode}"] = []
            for container_id in ids:
                state = json.loads(subprocess.run(bench.clave_argv("state", container_id, vm=False),
                                                  capture_output=True, text=True, check=True).stdout)
                if state.get("status") != "running":
                    raise RuntimeError(f"{container_id} is {state.get('status')}, not running")
                results[f"{size} {mode}"].append(VmMemory(int(state["pid"])))
        finally:
            for container_id in ids:
                bench.delete(container_id)
    mib = 1024
    print(f"\nper VM, medians over the VMs (MiB); after: {_load_note()}")
    columns = ("VMs, how", "QEMU RSS/PSS", "guest RAM RSS/PSS", "TCG cache RSS", "QEMU rest RSS/PSS",
               "keeper RSS/PSS", "other RSS", "total PSS", "/160", "total-TCG", "/160")
    print("  ".join(columns))
    print("-" * len("  ".join(columns)))
    for label, vms in results.items():
        def med(values: list[int]) -> float:
            return summarize([v / mib for v in values]).median

        def pair(rss: list[int], pss: list[int]) -> str:
            return f"{med(rss):.1f}/{med(pss):.1f}"

        total = med([v.qemu_pss + v.keeper_pss + v.other_pss for v in vms])
        no_tcg = med([v.qemu_pss + v.keeper_pss + v.other_pss - v.tcg_pss for v in vms])
        cells = (label, pair([v.qemu_rss for v in vms], [v.qemu_pss for v in vms]),
                 pair([v.ram_rss for v in vms], [v.ram_pss for v in vms]), f"{med([v.tcg_rss for v in vms]):.1f}",
                 pair([v.qemu_rss - v.ram_rss - v.tcg_rss for v in vms],
                      [v.qemu_pss - v.ram_pss - v.tcg_pss for v in vms]),
                 pair([v.keeper_rss for v in vms], [v.keeper_pss for v in vms]),
                 f"{med([v.other_rss for v in vms]):.1f}",
                 f"{total:.1f}", f"{total / KATA_QEMU_OVERHEAD_MIB:.2f}", f"{no_tcg:.1f}",
                 f"{no_tcg / KATA_QEMU_OVERHEAD_MIB:.2f}")
        print("  ".join(f"{cell:>{len(column)}}" for cell, column in zip(cells, columns, strict=True)))
    print("total = QEMU + keeper + other children, PSS; total-TCG leaves out TCG's translation cache (KVM has none, "
          "and Kata's 160 MiB is a KVM figure); the rest of QEMU includes the guest kernel file it keeps mapped "
          "(page cache, shared between VMs)")
    for path in sorted(TEMPLATE_RAM_FILES):
        try:
            allocated = os.stat(path).st_blocks * 512 / (1 << 20)
            print(f"clones map the template's RAM file {path}: {allocated:.0f} MiB of tmpfs, once per host and "
                  "VM shape")
        except OSError:
            pass
    return results


def _io_bundle(bench: PathBench, name: str, helper: str, vm: bool) -> tuple[str, str]:
    """A bundle running IO_SCRIPT with /data bound from a host directory; vm: may drop the guest's caches."""
    import json

    from clave.tools.bundles import make_bundle

    bundle = os.path.join(bench.work, f"bundle-io-{name}")
    volume = os.path.join(bench.work, f"volume-{name}")
    os.makedirs(volume)
    config = make_bundle(bundle, ["/bin/sh", "/iobench.sh", str(IO_FILE_MIB), str(IO_RANDOM_READS)])
    rootfs = os.path.join(bundle, "rootfs")
    shutil.copy2(helper, os.path.join(rootfs, "bin", "iohelper"))
    with open(os.path.join(rootfs, "iobench.sh"), "w") as f:
        f.write(IO_SCRIPT)
    config["mounts"].append({"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]})
    if vm:  # the guest's own kernel: dropping its caches touches nothing of the host
        config["linux"]["readonlyPaths"] = [p for p in config["linux"].get("readonlyPaths", []) if p != "/proc/sys"]
        for kind in ("bounding", "effective", "permitted"):
            config["process"]["capabilities"][kind].append("CAP_SYS_ADMIN")
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return bundle, volume


def _parse_io(out: str) -> dict[str, tuple[float, str]]:
    """{"rootfs seqwrite": (MB/s, how), ...} from IO_SCRIPT's lines."""
    results = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 4 or not parts[2].isdigit():
            continue
        place, measure, ns, how = parts
        size = IO_RANDOM_READS * 4096 if measure == "randread" else IO_FILE_MIB << 20
        results[f"{place} {measure}"] = (size / 1e6 / (int(ns) / 1e9) if int(ns) else 0.0, how)
    if len(results) != 8:
        raise RuntimeError(f"unexpected IO output: {out!r}")
    return results


def io_section(bench: PathBench, runs: int) -> dict[str, list[dict[str, tuple[float, str]]]]:
    from functools import partial

    helper = os.path.join(bench.work, "iohelper")
    source = helper + ".c"
    with open(source, "w") as f:
        f.write(IOHELPER_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", helper, source], check=True)
    vm_bundle, _ = _io_bundle(bench, "vm", helper, vm=True)
    runc_bundle, _ = _io_bundle(bench, "runc", helper, vm=False)

    def run_io(vm: bool) -> dict[str, tuple[float, str]]:
        container_id = bench.next_id("io-vm" if vm else "io-runc")
        if vm:
            argv = bench.clave_argv("run", "--bundle", vm_bundle, container_id)
        else:
            argv = ["runc", "--root", bench.runc_root, "run", "--bundle", runc_bundle, container_id]
        out_path = os.path.join(bench.work, "io.out")
        try:
            with open(out_path, "w+") as out:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=bench.stderr.fileno())
                out.seek(0)
                text = out.read()
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:5])}... exited with {done.returncode}: {text[-500:]}")
            return _parse_io(text)
        finally:
            if vm:
                bench.delete(container_id)
            else:
                subprocess.run(["runc", "--root", bench.runc_root, "delete", "--force", container_id],
                               capture_output=True)

    print(f"\n## io: {runs} interleaved runs (one container each, {IO_FILE_MIB} MiB file, {IO_RANDOM_READS} random "
          f"4 KiB reads); {_load_note()}")
    samples = interleave({"vm": partial(run_io, True), "runc": partial(run_io, False)}, runs=runs, warmup=0)
    measures = list(samples["vm"][0])
    steps = {measure: {name: [run[measure][0] for run in runs_] for name, runs_ in samples.items()}
             for measure in measures}
    print(f"\nMB/s (higher is better; vm/runc >= 0.80 is the goal for the rootfs); after: {_load_note()}")
    print(steps_table(steps, baseline="runc", unit="MB/s"))
    for name, runs_ in samples.items():
        how = {measure: sorted({run[measure][1] for run in runs_}) for measure in measures}
        print(f"{name}: " + ", ".join(f"{m} {'/'.join(h)}" for m, h in how.items()))
    print("vm: rootfs = the container's qcow2 layer over its cached ext4 base (virtio-blk, cache=writeback); "
          "volume = virtio-fs (QEMU's virtiofsd); runc: both are the host's ext4 directly")
    print("9p: not measured, Debian's cloud kernel (the guest's) has no 9p")
    return samples


def paths_main(args: argparse.Namespace, guest: Guest) -> None:
    sections = [s for s in args.paths.split(",") if s]
    unknown = set(sections) - set(PATH_SECTIONS)
    if unknown:
        raise SystemExit(f"--paths: unknown section(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(PATH_SECTIONS)})")
    for tool in ("runc", "containerd", "ctr", "gcc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_vm.py --paths needs {tool}")
    print(f"# bench_vm --paths {','.join(sections)}: {machine_description()}")
    print(f"# accel {_accel(guest)}, guest {guest.kernel_release}, microvm, 1 vCPU, -m {GUEST_RAM_MIB}; "
          f"{_load_note()}; other jobs may share this machine")
    work = tempfile.mkdtemp(prefix="bvm-paths-", dir="/var/tmp")
    bench = PathBench(work)
    try:
        if "start" in sections:
            start_section(bench, guest, args.path_runs, args.warmup)
        if "memory" in sections:
            memory_section(bench, [1, 5])
        if "io" in sections:
            io_section(bench, args.path_runs)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["templates"]:
        templates(sys.argv[2:])
    else:
        main()
