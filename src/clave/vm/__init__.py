"""VM sandboxes: the guest builder, the QEMU driver and the host side of the guest agent.

Public surface for a host-side handler (nothing here imports the engine, the shim or the handlers; only the
guest agent, which runs inside the VM, uses Clave's engine):

    guest = build_guest()                        # or current_guest(); digests in guest.digests()
    vm = Vm.create(VmConfig(state_dir, guest, disks=[Disk("rootfs.img", serial="ctr1")]))
    vm.start()                                   # boots, waits for the agent; vm.timings
    agent = vm.agent()                           # AgentClient: create_container, start, exec, wait, io...
    vm.destroy()                                 # or destroy_state_dir(state_dir) after a crash
    acceleration()                               # "kvm" or "tcg", and why
"""

from __future__ import annotations

from clave.vm.errors import AgentError, BootError, BuildError, ResourceError, VmError, VmGone
from clave.vm.guest import Guest, build_guest, current_guest

__all__ = [
    "AgentError",
    "BootError",
    "BuildError",
    "Guest",
    "ResourceError",
    "VmError",
    "VmGone",
    "build_guest",
    "current_guest",
]
