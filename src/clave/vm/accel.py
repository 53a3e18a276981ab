"""Which accelerator boots guests here: KVM only when the real guest was seen booting under it, TCG otherwise.

A /dev/kvm that exists proves nothing: on a PVM host QEMU aborts (``failed to set MSR 0x10a``) or the guest
crawls and dies. So the probe boots the built guest once with ``-accel kvm`` and a short timeout, and waits
for the guest's stage-2 init line (userspace running from the guest image). The verdict is cached per host
kernel, QEMU version and guest kernel digest in /var/lib/clave/vm/accel.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from clave.vm import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from clave.vm.guest import Guest

PROBE_TIMEOUT = 10.0


class Verdict:
    def __init__(self, accel: str, reason: str, cached: bool = False) -> None:
        self.accel = accel  # "kvm" or "tcg"
        self.reason = reason  # why KVM is (not) used
        self.cached = cached

    def __repr__(self) -> str:
        return f"Verdict({self.accel!r}, {self.reason!r})"


def _cache_key(guest: Guest) -> str:
    from clave.vm.qemu import qemu_version

    return f"{os.uname().release}|{qemu_version()}|{guest.digests()['kernel']}"


def acceleration(guest: Guest | None = None, force_probe: bool = False) -> Verdict:
    """The accelerator to use and why; for ``clave check`` too. Without a built guest the probe cannot
    run, and the verdict says so."""
    if not os.path.exists("/dev/kvm"):
        return Verdict("tcg", "no /dev/kvm")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Verdict("tcg", "/dev/kvm is not accessible")
    if guest is None:
        from clave.vm.errors import BuildError
        from clave.vm.guest import current_guest

        try:
            guest = current_guest()
        except BuildError:
            return Verdict("tcg", "/dev/kvm exists, but no guest is built to probe it with")
    key = _cache_key(guest)
    cache: dict[str, dict[str, str]] = {}
    try:
        with open(paths.ACCEL_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        pass
    if not force_probe and key in cache:
        return Verdict(cache[key]["accel"], cache[key]["reason"], cached=True)
    verdict = probe_kvm(guest)
    cache[key] = {"accel": verdict.accel, "reason": verdict.reason, "at": str(int(time.time()))}
    os.makedirs(os.path.dirname(paths.ACCEL_CACHE), exist_ok=True)
    tmp = paths.ACCEL_CACHE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1)
    os.replace(tmp, paths.ACCEL_CACHE)
    return verdict


def probe_kvm(guest: Guest, timeout: float = PROBE_TIMEOUT) -> Verdict:
    """Boot ``guest`` under KVM until its userspace runs; the verdict names what happened otherwise."""
    from clave.vm.guest import MARK_AGENT
    from clave.vm.qemu import Vm, VmConfig

    state = tempfile.mkdtemp(prefix="kvm-probe-", dir=paths.VM_ROOT if os.path.isdir(paths.VM_ROOT) else None)
    os.rmdir(state)  # Vm.create makes it
    vm = Vm.create(VmConfig(state, guest, memory_mib=256, accel="kvm"))
    try:
        import subprocess

        with open(vm.path("qemu.log"), "ab") as log:
            vm.proc = subprocess.Popen(vm.command("kvm"), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True)
        vm.pid = vm.proc.pid
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if MARK_AGENT.encode() in vm._console_bytes():
                return Verdict("kvm", f"KVM booted the guest to userspace in {time.monotonic() - t0:.2f} s")
            if vm.proc.poll() is not None:
                return Verdict("tcg", f"KVM cannot run this guest: {vm._exit_reason() or 'QEMU exited'}")
            time.sleep(0.05)
        return Verdict("tcg", f"KVM did not bring the guest to userspace within {timeout:.0f} s "
                              f"(console: {vm.console_tail(1)})")
    finally:
        vm.destroy()
        shutil.rmtree(state, ignore_errors=True)
