"""Faults and bad input: QEMU killed, a guest that cannot boot, sizes out of bounds, destroy after a crash."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from clave.vm.errors import AgentError, BootError, ResourceError, VmError, VmGone
from clave.vm.guest import Guest
from clave.vm.qemu import Disk, Vm, VmConfig, destroy_state_dir
from tests.vm.conftest import qemu_pids_for, short_dir


class _Guest(Guest):
    """The built guest with another image (a corrupted copy)."""

    def __init__(self, base: Guest, image: str) -> None:
        self.directory = base.directory
        self.manifest = base.manifest
        self._image = image

    @property
    def image(self) -> str:
        return self._image


def assert_nothing_left(state: str) -> None:
    assert not os.path.exists(state)
    assert qemu_pids_for(state) == []


def test_qemu_killed_is_seen_and_destroy_leaves_nothing(guest: Guest) -> None:
    work = short_dir("vmf-")
    state = os.path.join(work, "vm")
    vm = Vm.create(VmConfig(state, guest))
    try:
        vm.start()
        agent = vm.agent()
        assert vm.running()
        os.kill(vm.pid, signal.SIGKILL)
        assert vm.wait(10) == -signal.SIGKILL
        assert not vm.running()
        with pytest.raises(AgentError):
            agent.health(timeout=5)
        agent.close()
        with pytest.raises(VmGone, match="killed by signal 9"):
            vm.agent()
    finally:
        vm.destroy()
    assert_nothing_left(state)
    os.rmdir(work)


def test_destroy_from_the_state_dir_alone_after_a_caller_crash(guest: Guest) -> None:
    work = short_dir("vmf-")
    state = os.path.join(work, "vm")
    vm = Vm.create(VmConfig(state, guest))
    vm.start()
    pid = vm.pid
    with open(os.path.join(state, "vm.json")) as f:
        assert json.load(f)["pid"] == pid
    # the caller is gone (no Popen, no objects): only the directory remains
    vm.proc = None
    del vm
    destroy_state_dir(state)
    assert_nothing_left(state)
    try:
        os.waitpid(pid, 0)  # reap the zombie of our child, as an init would
    except ChildProcessError:
        pass
    assert not os.path.exists(f"/proc/{pid}")
    os.rmdir(work)


def test_broken_kernel_command_line_is_one_line_with_the_console_tail(guest: Guest) -> None:
    work = short_dir("vmf-")
    state = os.path.join(work, "vm")
    vm = Vm.create(VmConfig(state, guest, kernel_args="rdinit=/nonexistent", boot_timeout=20))
    try:
        with pytest.raises(BootError) as info:
            vm.start()
        message = str(info.value)
        assert "\n" not in message
        assert "console:" in message and "Kernel panic" in message
        assert vm.timings.attempts == 2  # one retry
    finally:
        vm.destroy()
    assert_nothing_left(state)
    os.rmdir(work)


def test_corrupted_guest_image_is_one_line_with_the_console_tail(guest: Guest) -> None:
    work = short_dir("vmf-")
    bad = os.path.join(work, "bad.img")
    shutil.copyfile(guest.image, bad)
    with open(bad, "r+b") as f:
        f.seek(1024)
        f.write(b"\0" * 4096)  # the ext4 superblock and group descriptors
    state = os.path.join(work, "vm")
    vm = Vm.create(VmConfig(state, _Guest(guest, bad), boot_timeout=20))
    try:
        with pytest.raises(BootError, match="cannot mount the guest image"):
            vm.start()
    finally:
        vm.destroy()
    assert_nothing_left(state)
    shutil.rmtree(work)


def test_sizes_out_of_bounds_are_refused_before_anything_exists(guest: Guest) -> None:
    work = short_dir("vmf-")
    state = os.path.join(work, "vm")
    with pytest.raises(ResourceError, match="more than this host has"):
        Vm.create(VmConfig(state, guest, memory_mib=1 << 30))
    with pytest.raises(ResourceError, match="at least 128 MiB"):
        Vm.create(VmConfig(state, guest, memory_mib=64))
    with pytest.raises(ResourceError, match="this host's CPUs"):
        Vm.create(VmConfig(state, guest, vcpus=(os.cpu_count() or 1) + 1))
    with pytest.raises(VmError, match="does not exist"):
        Vm.create(VmConfig(state, guest, disks=[Disk("/nonexistent.img", "d1")]))
    with pytest.raises(VmError, match="serial"):
        Disk("/x.img", "bad serial!")
    assert not os.path.exists(state)
    os.rmdir(work)
