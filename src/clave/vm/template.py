"""VM templates (Kata's VM factory, on this machine): boot a guest shape once, then start clones of it.

A template VM is booted with its RAM in a file on tmpfs (``-object memory-backend-file,share=on`` under
/dev/shm), its agent waited for (and, with a vTPM, its measured boot finished and its quote modules imported),
paused, and its device state saved (``migrate-set-capabilities x-ignore-shared``, ``migrate fd:``: the RAM stays
in the file, only ~85 KB of device state is written; ~530 KB on q35 with its firmware and the TPM's state). A
clone maps the same file copy-on-write (``share=off``), starts with ``-incoming defer``, loads the state with
``migrate-incoming fd:`` and ``cont``. QEMU's seccomp sandbox forbids ``exec:cat``: the state file is handed over
as an open fd (QMP ``getfd``).

Keyed by the digests of all inputs: the QEMU command line (kernel, initramfs and image paths, kernel arguments,
machine, accelerator, vCPUs, memory, devices), the guest's component digests and their files' identity (device,
inode, size, mtime), QEMU's version and RECIPE_VERSION. Kept in /var/lib/clave/vm/templates/KEY/template.json
(metadata) and state (device state), with the RAM in /dev/shm/clave-vm-KEY.mem. Before every clone the state's
SHA-256 and size and the RAM file's size and identity (device, inode, mtime) are checked against the metadata: a
corrupt or stale template is rebuilt, never restored. A clone that still fails to restore falls back to a boot
(one notice line). One template is built at a time per key (flock on KEY.lock: a second create waits and then
clones it); a rebuild writes new files and renames them, so running clones keep the old ones they mapped.

Disks. A template cannot carry a pod's disks, and a clone's device line-up must equal its template's. Hot-plug
is impossible on microvm (virtio-mmio has no hot-plug) and PCI hot-plug on q35 would make two machines behave
differently, so a template reserves ``template_slots`` virtio-blk devices (serials ``clave-slot0``...) on an empty
``null-co`` node; a clone swaps a slot's medium before ``cont`` (QMP ``blockdev-add`` of the file,
``blockdev-reopen`` of the slot's raw node onto it, ``block_resize`` so the guest sees the new capacity) and tells
the agent which slot carries which of the host's serials (SetDiskSerials), so ``blk_storage(serial, ...)`` works
as on a booted VM. Measured here (TCG, microvm, -m 256): the swap of one slot takes ~9 ms of QMP; a clone's QEMU
start to agent ready ~150 ms, against a boot's 4-8 s. Four empty slots cost the template nothing measurable.

Not templated (they boot, with a notice): VMs with NICs or user networking (a NIC's MAC is device state the clone
would inherit, and taps are per pod), more disks than slots, VmConfig(template=False) (the annotation
``io.clave.vm.template=false``: a pod that refuses sharing pages with other pods, see docs/vm.md).

A fresh identity for every clone, right after restore: the agent reseeds the guest's RNG from the host
(ReseedRandomDev, credited, then a crng reseed) and sets the clock (SetGuestDateTime); the kernel's boot_id is
made on its first read, which the template never does, so each clone draws its own after the reseed; hostname
and machine id are the pod's (CreateSandbox). With a vTPM each clone has its own swtpm process and state
directory; QEMU's migration copies the template's TPM state into it (tpm-emulator state blobs), so the agent
then stirs host entropy into the TPM and clears its owner hierarchy (RenewTpmIdentity: a new storage seed,
hence a new attestation key, created in the clone); the endorsement seed stays the template's (changing it needs
the platform hierarchy, which the firmware locked) and Clave's quotes never use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time

from clave.vm import paths
from clave.vm.errors import AgentError, BootError, VmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from clave.vm.qemu import Vm, VmConfig

RECIPE_VERSION = "1"
TEMPLATES = os.path.join(paths.VM_ROOT, "templates")
MEMORY_DIR = os.environ.get("CLAVE_VM_TEMPLATE_MEMORY", "/dev/shm")
SLOT_SERIAL = "clave-slot{}"
STATE_PLACEHOLDER = "@STATE@"
MIGRATE_TIMEOUT = 30.0
FAILED_PRECONDITION = 9  # the agent's ttrpc code for "no TPM in this guest"


class TemplateError(VmError):
    """A template could not be built or a clone could not be restored from it."""


def _migrate_caps(qmp: Any) -> None:
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


def _wait_migration(qmp: Any, timeout: float = MIGRATE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise TemplateError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() >= deadline:
            raise TemplateError(f"migration still {status} after {timeout:.0f} s")
        time.sleep(0.002)


def ineligible(config: VmConfig) -> str:
    """Why this VM cannot be a clone ("" when it can)."""
    if config.network or config.nics:
        return "its NICs cannot be in a template"
    if len(config.disks) > config.template_slots:
        return f"{len(config.disks)} disks, a template has {config.template_slots} slots"
    return ""


def _shape(config: VmConfig) -> VmConfig:
    """The template's config: the VM's, without its disks (they go into slots) and its state directory."""
    from clave.vm.qemu import VmConfig

    return VmConfig(STATE_PLACEHOLDER, config.guest, vcpus=config.vcpus, memory_mib=config.memory_mib,
                    machine=config.machine, accel=config.accel, boot_timeout=config.boot_timeout,
                    kernel_args=config.kernel_args, template=False, template_slots=config.template_slots,
                    tpm=config.tpm)


def command(config: VmConfig, state_dir: str, accel: str, memory: str, share: bool) -> list[str]:
    """QEMU's command line for the template (share=True) or a clone (share=False, -incoming defer)."""
    from clave.vm.qemu import Vm

    shape = _shape(config)
    shape.state_dir = state_dir
    if hasattr(config, "hotplug_slots"):  # q35 root ports (the vm handler's later disks): part of the shape
        shape.hotplug_slots = config.hotplug_slots
    cmd = Vm(shape).command(accel)
    bus = "device" if config.machine == "microvm" else "pci"
    cmd[cmd.index("-M") + 1] += ",memory-backend=mem"
    cmd += ["-object", f"memory-backend-file,id=mem,size={config.memory_mib}M,mem-path={memory},"
                       f"share={'on' if share else 'off'}"]
    for i in range(config.template_slots):
        cmd += ["-blockdev", f"driver=null-co,size=0,node-name=slot{i}-null",
                "-blockdev", f"driver=raw,file=slot{i}-null,node-name=slot{i}",
                "-device", f"virtio-blk-{bus},drive=slot{i},serial={SLOT_SERIAL.format(i)}"]
    if not share:
        cmd += ["-incoming", "defer"]
    return cmd


def key_of(config: VmConfig, accel: str) -> tuple[str, dict[str, Any]]:
    """The template's key: a digest of everything that shapes the saved guest."""
    from clave.vm.qemu import qemu_version

    g = config.guest
    files = {}
    for role, path in (("kernel", g.kernel), ("initramfs", g.initramfs), ("image", g.image)):
        st = os.stat(path)
        files[role] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    inputs = {
        "recipe": RECIPE_VERSION,
        "qemu": qemu_version(),
        "command": command(config, STATE_PLACEHOLDER, accel, "@MEMORY@", True),
        "digests": g.digests(),
        "files": files,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32], inputs


class Template:
    """A built template's files and metadata."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.directory = os.path.join(TEMPLATES, key)
        self.state = os.path.join(self.directory, "state")
        self.meta_path = os.path.join(self.directory, "template.json")
        self.memory = os.path.join(MEMORY_DIR, f"clave-vm-{key}.mem")

    def problem(self) -> str:
        """Why this template must not be restored ("" when it is sound): missing, corrupt or stale."""
        try:
            with open(self.meta_path) as f:
                meta: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return "not built"
        except (OSError, ValueError) as exc:
            return f"metadata unreadable ({exc})"
        try:
            st = os.stat(self.memory)
        except OSError:
            return f"memory file {self.memory} is gone"
        mem = meta.get("memory", {})
        recorded = [mem.get(k) for k in ("dev", "ino", "size", "mtime_ns")]
        if [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns] != recorded:
            return f"memory file {self.memory} is not the one the template saved"
        try:
            digest = _sha256(self.state)
        except OSError:
            return "device state file is gone"
        if digest != meta.get("state_sha256"):
            return "device state file does not match its recorded digest"
        return ""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(key: str, mode: int) -> Iterator[None]:
    os.makedirs(TEMPLATES, exist_ok=True)
    fd = os.open(os.path.join(TEMPLATES, f"{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def build(config: VmConfig, accel: str, key: str, inputs: dict[str, Any], timeout: float) -> Template:
    """Boot the template VM, wait for its agent (and measured boot), pause it and save it. Call under the key's
    exclusive lock."""
    from clave.vm.client import AgentClient
    from clave.vm.qemu import RECONNECT_DELAY, Vm
    from clave.vm.qmp import Qmp, QmpError

    t = Template(key)
    work = os.path.join(TEMPLATES, f"{key}.build")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    memory_tmp = t.memory + ".build"
    if os.path.exists(memory_tmp):
        os.unlink(memory_tmp)
    shape = _shape(config)
    shape.state_dir = work
    vm = Vm(shape)  # for its swtpm and console helpers; the command line is the template's
    vm.accel = accel
    try:
        if config.tpm:
            vm.start_swtpm()
        t0 = time.monotonic()
        with open(os.path.join(work, "qemu.log"), "ab") as log:
            vm.proc = subprocess.Popen(command(config, work, accel, memory_tmp, True), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, start_new_session=True, close_fds=True)
        vm.pid = vm.proc.pid
        try:
            qmp = vm._qmp = Qmp.connect(vm.path("qmp.sock"), timeout=timeout)
        except QmpError as exc:
            raise TemplateError(f"template QEMU did not start: {vm._exit_reason() or exc}") from None
        agent = AgentClient.connect(vm.agent_socket)
        while not agent.ready(timeout=0.25):
            if not vm.running():
                raise TemplateError(f"template guest stopped: {vm._exit_reason()}; console: {vm.console_tail()}")
            if time.monotonic() - t0 > timeout:
                raise TemplateError(f"template agent not ready within {timeout:.0f} s; console: {vm.console_tail()}")
        if config.tpm:
            try:  # waits for the measured boot and imports the quote's modules, for every clone
                agent.quote(b"template")
            except AgentError as exc:
                if exc.code != FAILED_PRECONDITION:  # no TPM in the guest (clave.vm.swtpm): nothing to warm
                    raise
        agent.warm_up()  # once the agent has imported what containers need, one container: clones start warm
        boot_s = time.monotonic() - t0
        agent.close()
        time.sleep(RECONNECT_DELAY)  # the guest sees the hang-up and waits for its next host (a clone)
        qmp.stop()
        _migrate_caps(qmp)
        state_tmp = os.path.join(work, "state")
        fd = os.open(state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.getfd("state", fd)
        finally:
            os.close(fd)
        qmp.execute("migrate", {"uri": "fd:state"})
        _wait_migration(qmp)
        vm._stop_process()  # QEMU and its swtpm: the template's RAM is in the file, its devices in state
        st = os.stat(memory_tmp)
        meta = {"key": key, "created": time.time(), "boot_seconds": round(boot_s, 3), "inputs": inputs,
                "state_sha256": _sha256(state_tmp), "state_size": os.path.getsize(state_tmp)}
        os.makedirs(t.directory, exist_ok=True)
        os.replace(state_tmp, t.state)
        os.replace(memory_tmp, t.memory)
        meta["memory"] = {"path": t.memory, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns}
        tmp = t.meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp, t.meta_path)
        return t
    except (VmError, OSError) as exc:
        raise TemplateError(f"template build failed: {exc}") from None
    finally:
        vm._stop_process()
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(memory_tmp)


def _prune_superseded(key: str, inputs: dict[str, Any]) -> None:
    """Remove the templates of other guests (a rebuilt guest supersedes them): their RAM files hold tmpfs
    memory. A clone still running from one has its own copy-on-write mapping of the file."""
    for name in os.listdir(TEMPLATES):
        other = Template(name) if os.path.isdir(os.path.join(TEMPLATES, name)) and name != key else None
        if other is None:
            continue
        try:
            with open(other.meta_path) as f:
                digests = json.load(f).get("inputs", {}).get("digests")
        except (OSError, ValueError):
            continue  # being built, or broken: problem() deals with it when it is used
        if digests != inputs["digests"]:
            with contextlib.suppress(TemplateError, OSError):
                remove(name)


def remove(key: str) -> None:
    """Forget a template (its metadata, state and RAM file)."""
    t = Template(key)
    with _locked(key, fcntl.LOCK_EX):
        shutil.rmtree(t.directory, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t.memory)


def _notice(vm: Vm, message: str) -> None:
    line = f"clave: vm: {message}"
    vm.notices.append(line)  # the VM's owner tells its user (a keeper's stderr is the container's)


def start_clone(vm: Vm, accel: str, timeout: float) -> bool:
    """Start ``vm`` as a clone of its shape's template (building it first when missing, corrupt or stale).
    False, after one notice line, when the VM must boot instead."""
    reason = ineligible(vm.config)
    if reason:
        _notice(vm, f"booting without a template: {reason}")
        return False
    try:
        key, inputs = key_of(vm.config, accel)
        t = Template(key)
        with _locked(key, fcntl.LOCK_SH):
            problem = t.problem()
            if not problem:
                return _restore_or_boot(vm, t, accel, timeout)
        with _locked(key, fcntl.LOCK_EX):
            problem = t.problem()
            if problem:  # still (another create may have built it while this one waited)
                if problem != "not built":
                    _notice(vm, f"template {key[:12]} rebuilt: {problem}")
                build(vm.config, accel, key, inputs, max(timeout, 60.0))
                _prune_superseded(key, inputs)
                vm.template_built = True
        with _locked(key, fcntl.LOCK_SH):
            problem = t.problem()
            if problem:
                raise TemplateError(f"template {key[:12]} unusable right after its build: {problem}")
            return _restore_or_boot(vm, t, accel, timeout)
    except (VmError, OSError) as exc:
        _notice(vm, f"booting without a template: {exc}")
        return False


def _restore_or_boot(vm: Vm, t: Template, accel: str, timeout: float) -> bool:
    try:
        restore(vm, t, accel, timeout)
        return True
    except (VmError, OSError) as exc:
        vm._stop_process()
        for name in ("console.log", "qmp.sock", "agent.sock", "qemu.pid"):
            with contextlib.suppress(FileNotFoundError):
                if name == "console.log":
                    os.replace(vm.path(name), vm.path("console.1.log"))
                else:
                    os.unlink(vm.path(name))
        vm.template_key = ""
        _notice(vm, f"template {t.key[:12]} did not restore, booting instead: {exc}")
        return False


def restore(vm: Vm, t: Template, accel: str, timeout: float) -> None:
    """Spawn the clone, load the template's state, put the VM's disks into slots, resume it, wait for its agent
    and give it its own identity (RNG, clock, disk serials, TPM)."""
    from clave.linux.procfs import start_time
    from clave.vm.client import AgentClient
    from clave.vm.qemu import Timings
    from clave.vm.qmp import Qmp, QmpError

    config = vm.config
    vm.accel = accel
    vm.timings = Timings()
    vm.timings.attempts = 1
    vm.template_key = t.key
    if config.tpm:
        vm.start_swtpm()  # its own process and state directory; the migration fills it with the template's
    t0 = time.monotonic()
    with open(vm.path("qemu.log"), "ab") as log:
        vm.proc = subprocess.Popen(command(config, vm.state_dir, accel, t.memory, False), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=log, start_new_session=True, close_fds=True)
    vm.pid = vm.proc.pid
    vm.pid_start = start_time(vm.pid)
    vm._save()
    try:
        qmp = vm._qmp = Qmp.connect(vm.path("qmp.sock"), timeout=timeout)
    except QmpError as exc:
        raise BootError(f"QEMU did not start: {vm._exit_reason() or exc}") from None
    vm.timings.vmm_started = time.monotonic() - t0
    _migrate_caps(qmp)
    fd = os.open(t.state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        qmp.getfd("state", fd)
    finally:
        os.close(fd)
    qmp.execute("migrate-incoming", {"uri": "fd:state"})
    _wait_migration(qmp)
    vm.timings.kernel_up = time.monotonic() - t0  # the guest's RAM and devices are back
    serials = {}
    for i, disk in enumerate(config.disks):
        _insert(qmp, i, disk.path, disk.readonly, disk.format)
        serials[disk.serial] = SLOT_SERIAL.format(i)
    qmp.cont()
    agent = vm._agent = AgentClient.connect(vm.agent_socket)
    deadline = t0 + timeout
    while not agent.ready(timeout=0.25):
        if not vm.running():
            raise BootError(f"the clone stopped before its agent answered ({vm._exit_reason()})")
        if time.monotonic() >= deadline:
            raise BootError(f"the clone's agent did not answer within {timeout:.0f} s")
    vm.timings.agent_ready = time.monotonic() - t0
    agent.reseed_random(os.urandom(64))
    agent.set_time()
    if serials:
        agent.set_disk_serials(serials)
    if config.tpm:
        try:
            agent.renew_tpm_identity(os.urandom(64))
        except AgentError as exc:
            if exc.code != FAILED_PRECONDITION:  # the guest sees no TPM (clave.vm.swtpm): nothing to renew
                raise
    vm._save()


def _insert(qmp: Any, slot: int, path: str, readonly: bool, fmt: str = "raw") -> None:
    """Swap slot ``slot``'s medium for the image at ``path`` (before the clone runs, or later for a hot add)."""
    node = f"slot{slot}"
    qmp.execute("blockdev-add", {"driver": "file", "filename": os.path.abspath(path), "node-name": f"{node}-file",
                                 "read-only": readonly})
    child, size = f"{node}-file", os.path.getsize(path)
    if fmt == "qcow2":  # a container's layer: the slot's raw node passes its virtual disk through
        child, size = f"{node}-fmt", _qcow2_virtual_size(path)
        qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": child, "file": f"{node}-file",
                                     "read-only": readonly})
    elif fmt != "raw":
        raise TemplateError(f"disk format {fmt!r}: template slots take raw or qcow2 images")
    qmp.execute("blockdev-reopen", {"options": [{"driver": "raw", "node-name": node, "file": child,
                                                 "read-only": readonly}]})
    # the device tells the guest its new capacity (config change)
    qmp.execute("block_resize", {"node-name": node, "size": size})


def _qcow2_virtual_size(path: str) -> int:
    """The disk size in a qcow2 header (big-endian uint64 at offset 24)."""
    with open(path, "rb") as f:
        header = f.read(32)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise TemplateError(f"{path} is not a qcow2 image")
    return int.from_bytes(header[24:32], "big")
