"""The hypervisor driver: QEMU from Debian, one process per VM, everything it has under one state directory.

Machine: ``-M microvm,x-option-roms=off`` (virtio-mmio devices, no firmware, no PCI) by default, ``q35`` when a
device needs PCI (a vTPM). The kernel is booted directly through its PVH entry. No default devices, no user
config, no network unless asked (user-mode networking, or ``nics``: taps of the pod network namespace, see
clave.vm.network), QEMU's own seccomp filter (``-sandbox on`` with obsolete, elevateprivileges, spawn and
resourcecontrol denied). Under TCG the guest gets
``tsc_early_khz=`` from the host's /proc/cpuinfo: without it about one boot in ten hangs calibrating the TSC.

State directory (created by create(), removed by destroy()):

    vm.json       what destroy() needs after a crash: pid, its start time, the files below
    qemu.pid      written by QEMU itself (covers a crash before vm.json has the pid)
    qmp.sock      QMP monitor            agent.sock   the agent's virtio-serial port (ttrpc)
    console.log   the guest's serial console (the first boot attempt's is kept as console.1.log)
    qemu.log      QEMU's own stderr

Sizing: ``vcpus`` 1 (DEFAULT_VCPUS) up to the host's CPU count; ``memory_mib`` 256 (DEFAULT_MEMORY_MIB) from
MIN_MEMORY_MIB = 128 (the smallest that boots this guest) up to the host's MemTotal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

from clave.linux.procfs import alive, proc_stat, start_time
from clave.vm import guest as guest_mod
from clave.vm import paths
from clave.vm.errors import BootError, ResourceError, VmError, VmGone

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from clave.vm.client import AgentClient
    from clave.vm.guest import Guest
    from clave.vm.network import Nic
    from clave.vm.qmp import Qmp
    from clave.vm.virtiofs import Share

QEMU = "qemu-system-x86_64"
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256
MIN_MEMORY_MIB = 128
TCG_BOOT_TIMEOUT = 30.0
KVM_BOOT_TIMEOUT = 10.0
MACHINES = ("microvm", "q35")
RECONNECT_DELAY = 0.2
MAX_SHARES = 16  # virtio-fs shares (bound host directories) one VM takes
# vm.sock and exit.json belong to the VM's host process (clave.vm.host, the vm handler's keeper).
STATE_FILES = ("vm.json", "qemu.pid", "qmp.sock", "agent.sock", "console.log", "console.1.log", "qemu.log", "vm.sock",
               "exit.json", "virtiofsd.log", *(f"fs{i}.sock" for i in range(MAX_SHARES)))
# A VM with a vTPM boots through UEFI firmware: with QEMU's direct kernel boot on q35, SeaBIOS's ACPI tables plus
# the TPM's event log outgrow the room QEMU leaves above the initramfs, which then overwrites them (the guest
# loses ACPI and never finds the TPM). OVMF loads the kernel and initramfs itself, and measures them too.
FIRMWARE = "/usr/share/qemu/OVMF.fd"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class Disk:
    """A raw image given to the guest as virtio-blk; the agent finds it by ``serial`` (at most 20 bytes)."""

    def __init__(self, path: str, serial: str, readonly: bool = False, format: str = "raw") -> None:
        if format not in ("raw", "qcow2"):
            raise VmError(f"disk format {format!r}: raw or qcow2")
        if not serial or len(serial.encode()) > 20 or not all(c.isalnum() or c in "-_." for c in serial):
            raise VmError(f"disk serial {serial!r}: 1-20 characters of [A-Za-z0-9._-]")
        self.path = os.path.abspath(path)
        self.serial = serial
        self.readonly = readonly
        self.format = format  # qcow2: a container's writable layer over a shared base image


class VmConfig:
    def __init__(
        self,
        state_dir: str,
        guest: Guest,
        vcpus: int = DEFAULT_VCPUS,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        machine: str = "microvm",
        disks: list[Disk] | None = None,
        network: bool = False,
        accel: str | None = None,
        boot_timeout: float | None = None,
        kernel_args: str = "",
        hotplug_slots: int = 0,
        nics: list[Nic] | None = None,
        template: bool = True,
        template_slots: int = 4,
        tpm: bool = False,
        shares: list[Share] | None = None,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.guest = guest
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        self.machine = machine
        self.disks = list(disks or [])
        self.network = network
        self.accel = accel  # None: KVM if the probe showed it boots this guest, else TCG
        self.boot_timeout = boot_timeout
        self.kernel_args = kernel_args
        self.hotplug_slots = hotplug_slots  # q35 PCIe root ports for disks added later (a pod's next containers)
        self.nics = list(nics or [])  # taps of the pod network namespace's interfaces (clave.vm.network)
        # start() restores a clone of this shape's template when it can (clave.vm.template), else boots;
        # False: the pod refused sharing memory with other pods (io.clave.vm.template=false)
        self.template = template
        self.template_slots = template_slots  # a template's swappable virtio-blk slots: at most this many disks
        self.shares = list(shares or [])[:MAX_SHARES]  # host directories over virtio-fs (clave.vm.virtiofs)
        self.tpm = tpm  # a per-VM swtpm and measured boot (q35 only; clave.vm.swtpm, clave.vm.measure)


class Timings:
    """Seconds from spawning QEMU to each phase of a boot."""

    def __init__(self) -> None:
        self.vmm_started = 0.0  # QMP answered
        self.kernel_up = 0.0  # the first userspace line on the console
        self.agent_ready = 0.0  # the agent answered Health.Check
        self.attempts = 0

    def as_dict(self) -> dict[str, float]:
        return {"vmm_started": self.vmm_started, "kernel_up": self.kernel_up, "agent_ready": self.agent_ready,
                "attempts": self.attempts}


def check_resources(vcpus: int, memory_mib: int) -> None:
    """One line when the sizes are out of bounds or beyond this host."""
    cpus = os.cpu_count() or 1
    if not 1 <= vcpus <= cpus:
        raise ResourceError(f"vcpus {vcpus}: must be between 1 and {cpus} (this host's CPUs)")
    host_mib = host_memory_mib()
    if memory_mib < MIN_MEMORY_MIB:
        raise ResourceError(f"memory {memory_mib} MiB: the guest needs at least {MIN_MEMORY_MIB} MiB")
    if memory_mib > host_mib:
        raise ResourceError(f"memory {memory_mib} MiB: more than this host has ({host_mib} MiB)")


def host_memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def host_tsc_khz() -> int:
    """The host's CPU frequency in kHz (/proc/cpuinfo "cpu MHz"), for the guest's tsc_early_khz=."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 0


def qemu_version() -> str:
    """QEMU's version line (part of the accelerator's and the templates' keys), cached by the binary's identity:
    running it costs ~15 ms, twice on every VM start."""
    binary = shutil.which(QEMU)
    if binary is None:
        raise VmError(f"{QEMU} not found: install Debian's qemu-system-x86")
    st = os.stat(binary)
    identity = f"{binary} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"
    try:
        with open(paths.QEMU_VERSION_CACHE) as f:
            cached, version = f.read().split("\n")[:2]
        if cached == identity and version:
            return version
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise VmError(f"{binary} --version failed: {exc}") from None
    version = out.splitlines()[0].strip()
    try:
        os.makedirs(paths.VM_ROOT, exist_ok=True)
        partial = f"{paths.QEMU_VERSION_CACHE}.{os.getpid()}"
        with open(partial, "w") as f:
            f.write(f"{identity}\n{version}\n")
        os.replace(partial, paths.QEMU_VERSION_CACHE)
    except OSError:
        pass  # asked again next time
    return version


class Vm:
    """One QEMU process and its guest."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.pid_start = 0
        self.accel = ""
        self.timings = Timings()
        self._qmp: Qmp | None = None
        self._agent: AgentClient | None = None
        self.swtpm: subprocess.Popen[bytes] | None = None
        self.swtpm_pid = self.swtpm_start = 0
        self.virtiofsd: list[subprocess.Popen[bytes]] = []
        self.template_key = ""  # the template this VM was cloned from ("": booted)
        self.template_built = False  # this start() built that template first
        self.notices: list[str] = []  # why a template was not used, one line each (also on stderr)

    @classmethod
    def create(cls, config: VmConfig) -> Vm:
        """Validate the config and make the state directory (it must not exist: another VM may own it)."""
        check_resources(config.vcpus, config.memory_mib)
        if config.machine not in MACHINES:
            raise VmError(f"machine {config.machine!r}: one of {', '.join(MACHINES)}")
        kernel = config.guest.bzimage if config.tpm else config.guest.kernel
        for path in (kernel, config.guest.initramfs, config.guest.image):
            if not os.path.exists(path):
                raise VmError(f"guest file {path} is missing: run 'clave vm build-guest'")
        if config.tpm and not os.path.exists(FIRMWARE):
            raise VmError(f"{FIRMWARE} not found: a vTPM needs Debian's ovmf")
        for disk in config.disks:
            if not os.path.exists(disk.path):
                raise VmError(f"disk image {disk.path} does not exist")
        if len({d.serial for d in config.disks} | {guest_mod.GUEST_SERIAL}) != len(config.disks) + 1:
            raise VmError("disk serials must be unique (and not the guest image's)")
        if shutil.which(QEMU) is None:
            raise VmError(f"{QEMU} not found: install Debian's qemu-system-x86")
        if config.tpm and config.machine != "q35":
            raise VmError("a vTPM needs machine q35 (QEMU's TPM devices do not work on microvm)")
        if any(d.serial.startswith("clave-") for d in config.disks):
            raise VmError("disk serials starting with 'clave-' are reserved for the guest image and template slots")
        try:
            os.makedirs(config.state_dir, mode=0o700)
        except FileExistsError:
            raise VmError(f"VM state directory {config.state_dir} already exists") from None
        vm = cls(config)
        vm._save()
        return vm

    # -- paths ------------------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    @property
    def console_path(self) -> str:
        return self.path("console.log")

    @property
    def agent_socket(self) -> str:
        return self.path("agent.sock")

    def _save(self) -> None:
        doc = {"pid": self.pid, "pid_start": self.pid_start, "accel": self.accel, "machine": self.config.machine,
               "files": list(STATE_FILES), "timings": self.timings.as_dict(),
               "swtpm_pid": self.swtpm_pid, "swtpm_start": self.swtpm_start, "template": self.template_key,
               "virtiofsd": [[p.pid, start_time(p.pid)] for p in self.virtiofsd]}
        tmp = self.path("vm.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path("vm.json"))

    # -- command line -----------------------------------------------------------------------------------------
    def command(self, accel: str) -> list[str]:
        c = self.config
        g = c.guest
        mmio = c.machine == "microvm"
        bus = "device" if mmio else "pci"
        args = ["console=ttyS0", "quiet", "panic=-1", "random.trust_cpu=on"]
        if accel == "tcg":
            khz = host_tsc_khz()
            if khz:
                args.append(f"tsc_early_khz={khz}")
        if mmio:
            args.append("pci=off")
        if c.kernel_args:
            args.append(c.kernel_args)
        if c.tpm:
            from clave.vm.measure import boot_cmdline

            args.append(boot_cmdline(g.digests()))
        machine = "microvm,x-option-roms=off" if mmio else "q35"
        cmd = [
            QEMU, "-name", "clave-vm",
            "-M", machine, "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(c.vcpus), "-m", str(c.memory_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-sandbox", SANDBOX,
            "-kernel", g.bzimage if c.tpm else g.kernel, "-initrd", g.initramfs, "-append", " ".join(args),
            "-chardev", f"file,id=console,path={self.console_path}", "-serial", "chardev:console",
            "-qmp", f"unix:{self.path('qmp.sock')},server=on,wait=off",
            "-pidfile", self.path("qemu.pid"),
            "-device", f"virtio-serial-{bus},max_ports=2",
            "-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=clave.agent",
            "-object", "rng-random,id=rng,filename=/dev/urandom", "-device", f"virtio-rng-{bus},rng=rng",
            "-drive", f"file={g.image},if=none,id=guest,format=raw,readonly=on",
            "-device", f"virtio-blk-{bus},drive=guest,serial={guest_mod.GUEST_SERIAL}",
        ]
        for i, disk in enumerate(c.disks):
            ro = ",readonly=on" if disk.readonly else ""
            cmd += ["-drive", f"file={disk.path},if=none,id=disk{i},format={disk.format},cache=writeback{ro}",
                    "-device", f"virtio-blk-{bus},drive=disk{i},serial={disk.serial}"]
        for slot in range(c.hotplug_slots if not mmio else 0):
            cmd += ["-device", f"pcie-root-port,id=hp{slot},bus=pcie.0,chassis={slot + 1},slot={slot + 1}"]
        if c.network:
            cmd += ["-netdev", "user,id=net0", "-device", f"virtio-net-{bus},netdev=net0"]
        for i, nic in enumerate(c.nics):  # the tap's fd is passed open; the NIC answers to the interface's MAC
            cmd += ["-netdev", f"tap,id=nic{i},fd={nic.fd}", "-device", f"virtio-net-{bus},netdev=nic{i},mac={nic.mac}"]
        if c.tpm:
            from clave.vm.swtpm import qemu_args

            cmd += ["-bios", FIRMWARE, *qemu_args(self.state_dir)]
        if c.shares:
            from clave.vm import virtiofs

            cmd += virtiofs.qemu_args(self.state_dir, c.shares, c.memory_mib, mmio)
        return cmd

    # -- boot -------------------------------------------------------------------------------------------------
    def start(self) -> Timings:
        """Boot and wait for the agent; one retry after a failed attempt. Raises BootError with the console's
        tail when both attempts fail."""
        accel = self.config.accel
        if accel is None:
            from clave.vm.accel import acceleration

            accel = acceleration(self.config.guest).accel
        timeout = self.config.boot_timeout or (KVM_BOOT_TIMEOUT if accel == "kvm" else TCG_BOOT_TIMEOUT)
        if self.config.template and self.config.shares:  # vhost-user devices cannot be in a template
            self.notices.append("a VM with shared directories (virtio-fs) cannot be a template's clone: booting")
        elif self.config.template:
            from clave.vm.template import start_clone

            if start_clone(self, accel, timeout):
                return self.timings
        reason = ""
        for attempt in (1, 2):
            self.timings = Timings()
            self.timings.attempts = attempt
            try:
                self._boot(accel, timeout)
                self._save()
                return self.timings
            except BootError as exc:
                reason = str(exc)
                self._stop_process()
                if attempt == 1:
                    for name in ("console.log", "qmp.sock", "agent.sock", "qemu.pid"):
                        if os.path.exists(self.path(name)):
                            if name == "console.log":
                                os.replace(self.path(name), self.path("console.1.log"))
                            else:
                                os.unlink(self.path(name))
        raise BootError(f"{reason}; console: {self.console_tail()}")

    def _boot(self, accel: str, timeout: float) -> None:
        from clave.vm.client import AgentClient
        from clave.vm.qmp import Qmp, QmpError

        self.accel = accel
        t0 = time.monotonic()
        deadline = t0 + timeout
        if self.config.tpm:
            self.start_swtpm()
        self.start_virtiofsd()
        with open(self.path("qemu.log"), "ab") as log:
            self.proc = subprocess.Popen(self.command(accel), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, close_fds=True,
                                         pass_fds=[nic.fd for nic in self.config.nics])
        self.pid = self.proc.pid
        self.pid_start = start_time(self.pid)
        self._save()
        try:
            self._qmp = Qmp.connect(self.path("qmp.sock"), timeout=max(0.1, deadline - time.monotonic()))
        except QmpError as exc:
            raise BootError(f"QEMU did not start: {self._exit_reason() or exc}") from None
        self.timings.vmm_started = time.monotonic() - t0
        self._agent = AgentClient.connect(self.agent_socket)
        kernel_marker = guest_mod.MARK_INIT.encode()
        while True:
            if not self.timings.kernel_up and kernel_marker in self._console_bytes():
                self.timings.kernel_up = time.monotonic() - t0
            if self._agent.ready(timeout=0.25):
                self.timings.agent_ready = time.monotonic() - t0
                if not self.timings.kernel_up:
                    self.timings.kernel_up = self.timings.agent_ready
                return
            if not self.running():
                raise BootError(f"the guest stopped before its agent was ready ({self._exit_reason()})")
            if time.monotonic() >= deadline:
                phase = "agent" if self.timings.kernel_up else "kernel"
                raise BootError(f"no {phase} within {timeout:.0f} s ({accel})")

    def _console_bytes(self) -> bytes:
        try:
            with open(self.console_path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def console_tail(self, lines: int = 3) -> str:
        """The console's last lines, led by the guest's own failure line or the kernel's panic when there is
        one (a panic's stack trace would push it out of the tail)."""
        text = self._console_bytes().decode(errors="replace")
        all_lines = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
        tail = all_lines[-lines:]
        for line in reversed(all_lines):
            if guest_mod.MARK_FAIL in line or "Kernel panic" in line:
                if line not in tail:
                    tail.insert(0, line)
                break
        return " | ".join(tail) or "(empty)"

    def _exit_reason(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        try:
            with open(self.path("qemu.log"), errors="replace") as f:
                last = [line.strip() for line in f if line.strip()][-1:]
        except OSError:
            last = []
        parts = []
        if code is not None:
            parts.append(f"QEMU exited with status {code}" if code >= 0 else f"QEMU killed by signal {-code}")
        parts += last
        return ": ".join(parts)

    # -- running ----------------------------------------------------------------------------------------------
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return alive(self.pid, self.pid_start)

    def agent(self) -> AgentClient:
        """The agent's client (one connection per VM: QEMU's chardev serves one at a time)."""
        if self._agent is None or self._agent.closed:
            if not self.running():
                raise VmGone(f"VM {self.state_dir}: {self._exit_reason() or 'QEMU is not running'}")
            from clave.vm.client import AgentClient

            if self._agent is not None:
                # Let the guest see the hang-up first: a port cannot tell a quick reconnect from no
                # disconnect, and the agent must stop writing the old connection's frames (see FdChannel).
                time.sleep(RECONNECT_DELAY)
            self._agent = AgentClient.connect(self.agent_socket)
        return self._agent

    def qmp(self) -> Qmp:
        if self._qmp is None:
            from clave.vm.qmp import Qmp

            self._qmp = Qmp.connect(self.path("qmp.sock"))
        return self._qmp

    def wait(self, timeout: float | None = None) -> int | None:
        """QEMU's exit status once it exits (None on timeout)."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while alive(self.pid, self.pid_start):
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return -1

    def start_swtpm(self) -> None:
        """A fresh swtpm for this VM (before QEMU, which connects to it at start)."""
        from clave.vm import swtpm

        self.stop_swtpm()
        self.swtpm = swtpm.start(self.state_dir)
        self.swtpm_pid, self.swtpm_start = self.swtpm.pid, start_time(self.swtpm.pid)
        self._save()

    def start_virtiofsd(self) -> None:
        """One virtiofsd per shared directory (before QEMU, which connects to them at start)."""
        from clave.vm import virtiofs

        self.stop_virtiofsd()
        for i, share in enumerate(self.config.shares):
            self.virtiofsd.append(virtiofs.start(self.state_dir, i, share, self.path("virtiofsd.log")))

    def stop_virtiofsd(self) -> None:
        for proc in self.virtiofsd:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.virtiofsd = []

    def stop_swtpm(self) -> None:
        if self.swtpm is not None:
            if self.swtpm.poll() is None:
                self.swtpm.kill()
            self.swtpm.wait()
            self.swtpm = None
        else:
            _kill(self.swtpm_pid, self.swtpm_start)
        self.swtpm_pid = self.swtpm_start = 0

    def _stop_process(self) -> None:
        for closer in (self._agent, self._qmp):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # noqa: BLE001  # closing a dead VM's sockets may fail any way
                    pass
        self._agent = self._qmp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        else:
            _kill(self.pid, self.pid_start)
        self.pid = self.pid_start = 0
        self.stop_swtpm()
        self.stop_virtiofsd()

    def stop(self) -> None:
        """Stop QEMU, keeping its files (the console) until destroy()."""
        self._stop_process()
        self._save()

    def destroy(self) -> None:
        """Stop QEMU and remove every file of the VM and its state directory."""
        self._stop_process()
        destroy_state_dir(self.state_dir)


def _kill(pid: int, start: int, timeout: float = 5.0) -> None:
    """SIGKILL the process that started at ``start``, wait for its exit, and reap it if it is our child."""
    if alive(pid, start):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.01)
    if proc_stat(pid) == ("Z", start):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # another process's child: its parent reaps it


def destroy_state_dir(state_dir: str) -> None:
    """Kill the VM recorded in ``state_dir`` (pid and start time must match, so a recycled pid is left alone)
    and remove its files and the directory. Works after a crash of the caller at any point."""
    state_dir = os.path.abspath(state_dir)
    try:
        with open(os.path.join(state_dir, "vm.json")) as f:
            doc: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        doc = {}
    except (OSError, ValueError):
        doc = {}
    pid, start = int(doc.get("pid") or 0), int(doc.get("pid_start") or 0)
    _kill(pid, start)
    _kill(int(doc.get("swtpm_pid") or 0), int(doc.get("swtpm_start") or 0))
    for pid, start in doc.get("virtiofsd") or []:
        _kill(int(pid), int(start))
    # A crash between spawn and vm.json's pid: QEMU's own pid file, checked against its command line.
    try:
        with open(os.path.join(state_dir, "qemu.pid")) as f:
            qpid = int(f.read().strip() or 0)
        with open(f"/proc/{qpid}/cmdline", "rb") as f:
            if os.path.join(state_dir, "qmp.sock").encode() in f.read():
                _kill(qpid, start_time(qpid))
    except (OSError, ValueError):
        pass
    for name in (*STATE_FILES, "vm.json.tmp"):
        try:
            os.unlink(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass
    shutil.rmtree(os.path.join(state_dir, "tpm"), ignore_errors=True)  # clave.vm.swtpm's state
    try:
        os.rmdir(state_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise VmError(f"VM state directory {state_dir}: {exc.strerror} (files not made by the VM are in it)") from None
