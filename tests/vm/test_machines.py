"""The q35 machine (PCI virtio devices), for guests that need a device microvm lacks (a vTPM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def test_qemu_version_is_cached_by_the_binarys_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clave.vm import paths, qemu

    cache = tmp_path / "qemu-version"
    monkeypatch.setattr(paths, "QEMU_VERSION_CACHE", str(cache))
    real = qemu.qemu_version()
    assert real.startswith("QEMU emulator version ") and cache.read_text().endswith(f"\n{real}\n")
    identity = cache.read_text().split("\n")[0]
    cache.write_text(f"{identity}\nQEMU emulator version 0.0 (from the cache)\n")
    assert qemu.qemu_version() == "QEMU emulator version 0.0 (from the cache)"
    cache.write_text("/usr/bin/qemu-system-x86_64 0 0 0 0\nQEMU emulator version 0.0 (another binary)\n")
    assert qemu.qemu_version() == real  # the binary is not the one recorded: asked again
