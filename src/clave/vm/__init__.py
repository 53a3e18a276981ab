"""VM sandboxes: the guest builder, the QEMU driver and the host side of the guest agent.

Nothing here imports the engine, the shim or the handlers; only the guest agent (clave.vm.agent), which runs
inside the VM, uses Clave's engine. For a host-side handler:

    guest = current_guest()                      # or build_guest(); guest.digests() for measured boot
    vm = Vm.create(VmConfig(state_dir, guest, vcpus=1, memory_mib=256,
                            disks=[Disk("rootfs.img", serial="ctr1")]))
    vm.start()                                   # boot + agent ready, one retry; vm.timings
    agent = vm.agent()                           # AgentClient
    agent.create_container(cid, oci_config, [blk_storage("ctr1", "/run/clave-agent/mounts/ctr1")])
    io = agent.attach_io(cid, on_output=...)     # before start; io.write_stdin / io.close_stdin / io.join
    agent.start_container(cid); status = agent.wait_process(cid)
    vm.destroy()                                 # or destroy_state_dir(state_dir) after a crash
    acceleration()                               # Verdict(accel="kvm"|"tcg", reason): for `clave check`

Templates (clave.vm.template) are on by default: ``vm.start()`` restores a clone of the shape's template (built
on first use, ~0.1 s to agent ready instead of a boot), with the disks swapped into reserved slots and found by
the same serials, the RNG reseeded and the clock set; it boots instead, with one line in ``vm.notices`` (and on
stderr), when the VM has NICs, more disks than ``template_slots`` (4) or non-raw disks, or when the template
cannot be restored. ``vm.template_key`` says which template ("" after a boot). A pod that refuses shared pages
(annotation ``io.clave.vm.template=false``) gets ``VmConfig(..., template=False)``. After start, the pod's
identity: ``agent.create_sandbox(sandbox_id, hostname=..., machine_id=<32 hex>)``.

Measured boot (clave.vm.measure, clave.vm.swtpm): ``VmConfig(..., machine="q35", tpm=True)`` starts a per-VM
swtpm with the VM (stopped by destroy() and destroy_state_dir()); ``agent.measure_container(cid, image_digest)``
between create_container and start_container extends PCR 9; ``agent.quote(nonce)`` returns Clave TPM evidence
for ``clave-verify --tee tpm``; ``clave vm measure --policy-out FILE`` pins PCR 8. (The guest kernel does not
find the TPM on this machine yet: see clave.vm.swtpm.)
"""

from __future__ import annotations

# Resolved on first use (PEP 562): the guest agent imports this package too, and under TCG every import
# it does not need costs its start-up.
_EXPORTS = {
    "acceleration": "accel", "Verdict": "accel",
    "AgentClient": "client", "ProcessIO": "client", "blk_storage": "client",
    "AgentError": "errors", "BootError": "errors", "BuildError": "errors", "ResourceError": "errors",
    "VmError": "errors", "VmGone": "errors",
    "Guest": "guest", "build_guest": "guest", "current_guest": "guest",
    "DEFAULT_MEMORY_MIB": "qemu", "DEFAULT_VCPUS": "qemu", "MIN_MEMORY_MIB": "qemu", "Disk": "qemu",
    "Timings": "qemu", "Vm": "qemu", "VmConfig": "qemu", "check_resources": "qemu", "destroy_state_dir": "qemu",
}

TYPE_CHECKING = False
if TYPE_CHECKING:
    from clave.vm.accel import Verdict, acceleration
    from clave.vm.client import AgentClient, ProcessIO, blk_storage
    from clave.vm.errors import AgentError, BootError, BuildError, ResourceError, VmError, VmGone
    from clave.vm.guest import Guest, build_guest, current_guest
    from clave.vm.qemu import (
        DEFAULT_MEMORY_MIB,
        DEFAULT_VCPUS,
        MIN_MEMORY_MIB,
        Disk,
        Timings,
        Vm,
        VmConfig,
        check_resources,
        destroy_state_dir,
    )


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clave.vm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"clave.vm.{module}"), name)


__all__ = [
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_VCPUS",
    "MIN_MEMORY_MIB",
    "AgentClient",
    "AgentError",
    "BootError",
    "BuildError",
    "Disk",
    "Guest",
    "ProcessIO",
    "ResourceError",
    "Timings",
    "Verdict",
    "Vm",
    "VmConfig",
    "VmError",
    "VmGone",
    "acceleration",
    "blk_storage",
    "build_guest",
    "check_resources",
    "current_guest",
    "destroy_state_dir",
]
