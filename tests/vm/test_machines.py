"""The q35 machine (PCI virtio devices), for guests that need a device microvm lacks (a vTPM)."""

from __future__ import annotations

import os

from clave.vm.guest import Guest
from clave.vm.qemu import Disk, Vm, VmConfig
from tests.vm.conftest import qemu_pids_for, rootfs_image, short_dir


def test_q35_boots_the_same_guest_with_pci_devices(guest: Guest) -> None:
    work = short_dir("vmq-")
    state = os.path.join(work, "vm")
    disk = Disk(rootfs_image(os.path.join(work, "r.img")), "ctr1")
    vm = Vm.create(VmConfig(state, guest, machine="q35", disks=[disk]))
    try:
        assert "virtio-blk-pci,drive=disk0,serial=ctr1" in vm.command("tcg")
        vm.start()
        details = vm.agent().guest_details()
        assert details.kernel_release == guest.kernel_release
        assert vm.qmp().query_status() == "running"
    finally:
        vm.destroy()
    assert not os.path.exists(state) and qemu_pids_for(state) == []
    os.unlink(disk.path)
    os.rmdir(work)
