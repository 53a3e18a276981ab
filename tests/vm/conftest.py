"""Fixtures for VM sandboxes: the guest is built once per session (cached by its inputs), one VM is booted per
module and shared by its tests. Real QEMU, the real Debian kernel; root is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from clave.config.defaults import default_spec
from clave.tools.bundles import make_busybox_rootfs
from clave.vm.guest import Guest, build_guest
from clave.vm.qemu import Disk, Vm, VmConfig

MOUNTS = "/run/clave-agent/mounts"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "VM tests need root"
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "lz4", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make deps)"
    return None


@pytest.fixture(scope="session")
def guest() -> Guest:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return build_guest()


def rootfs_image(path: str, extra: dict[str, str] | None = None) -> str:
    """An ext4 image of Clave's busybox rootfs, made with mkfs.ext4 -d (no loop mount)."""
    tree = tempfile.mkdtemp(prefix="rootfs-")
    try:
        make_busybox_rootfs(tree)
        for rel, text in (extra or {}).items():
            with open(os.path.join(tree, rel.lstrip("/")), "w") as f:
                f.write(text)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, path, "32M"], check=True, capture_output=True)
    finally:
        shutil.rmtree(tree)
    return path


def oci_config(args: list[str], serial: str, **process: Any) -> dict[str, Any]:
    """A `clave spec` config running ``args`` from the rootfs on disk ``serial`` (mounted by the agent)."""
    config = default_spec()
    config["process"].update({"args": args, "terminal": False, **process})
    config["root"] = {"path": f"{MOUNTS}/{serial}", "readonly": False}
    return config


def short_dir(prefix: str) -> str:
    """A short path: the unix sockets inside must fit in 108 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def qemu_pids_for(state_dir: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if state_dir.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def vm(guest: Guest) -> Iterator[Vm]:
    """A booted VM with four container rootfs disks (serials ctr1..ctr4), shared by a module's tests."""
    work = short_dir("vmt-")
    disks = [Disk(rootfs_image(os.path.join(work, f"ctr{i}.img")), f"ctr{i}") for i in range(1, 5)]
    state = os.path.join(work, "vm")
    machine = Vm.create(VmConfig(state, guest, disks=disks))
    try:
        machine.start()
        yield machine
    finally:
        machine.destroy()
        assert not os.path.exists(state)
        assert qemu_pids_for(state) == []
        shutil.rmtree(work)
