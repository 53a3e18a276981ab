"""Isolation of a vm container, seen from inside one privileged container (every capability, no seccomp, no
masked paths, /dev/mem as a device): `uname -r` is the guest's kernel, no host pid, mount, device or file
outside its mounts is visible, and loading a kernel module or reading /dev/mem acts on the guest alone.

One VM (`clave --handler vm run`): every check reads one report the container prints."""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from clave.linux.capabilities import CAPABILITIES
from clave.vm import paths
from clave.vm.guest import Guest
from tests.vm.test_handler import Cli, _subreaper, assert_gone, cli, trace, vm_config, vm_guest, vm_rootfs

__all__ = ["_subreaper", "cli", "vm_guest", "vm_rootfs"]  # fixtures shared with test_handler

BIOS = (0xF0000, 0x10000)  # the BIOS area: below 1 MiB, readable through /dev/mem even with STRICT_DEVMEM


def guest_module(guest: Guest, dest: Path) -> Path | None:
    """dummy.ko of the guest's kernel, from the kernel package build-guest downloaded (None without it)."""
    debs = glob.glob(os.path.join(paths.DEB_CACHE, f"linux-image-{guest.kernel_release}_*.deb"))
    if not debs:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    member = f"./lib/modules/{guest.kernel_release}/kernel/drivers/net/dummy.ko"
    tar = subprocess.run(f"dpkg-deb --fsys-tarfile {debs[0]} | tar -x -C {dest} {member}", shell=True,
                         capture_output=True, text=True)
    found = dest / member
    return found if tar.returncode == 0 and found.exists() else None


def host_modules() -> str:
    try:
        return Path("/proc/modules").read_text()
    except OSError:
        return "(no module support)"


def test_a_privileged_vm_container_sees_only_its_guest(cli: Cli, vm_guest: Guest, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    shutil.copytree(cli.rootfs, rootfs, symlinks=True)
    module = guest_module(vm_guest, tmp_path / "kernel")
    if module is None:
        pytest.skip("the guest kernel's package is not in the deb cache (clave vm build-guest keeps it)")
    shutil.copy(module, rootfs / "dummy.ko")
    token = secrets.token_hex(8)
    secret = tmp_path / f"host-secret-{token}"  # on the host, outside every mount of the container
    secret.write_text("the host's\n")

    config = vm_config(["sh", "-c", f"""
echo "kernel $(uname -r)"
echo "cmdline $(cat /proc/cmdline)"
echo "pids $(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' ')"
echo "secret $(test -e {secret} && echo visible || echo absent)"
echo "found $(find / -path /proc -prune -o -path /sys -prune -o -name '*{token}*' -print 2>/dev/null | wc -l)"
echo "devices $(ls /dev | tr '\\n' ' ')"
while read -r src dst fstype rest; do echo "mount $src $dst $fstype"; done < /proc/mounts
insmod /dummy.ko && echo "insmod ok"
echo "module $(grep -c '^dummy ' /proc/modules) $(test -d /sys/module/dummy && echo loaded)"
echo "devmem $(dd if=/dev/mem bs=4096 skip={BIOS[0] // 4096} count={BIOS[1] // 4096} 2>/dev/null | sha256sum)"
"""], rootfs, readonly=True)
    every = sorted(CAPABILITIES)
    config["process"]["capabilities"] = {kind: every for kind in ("bounding", "effective", "permitted")}
    config["process"]["noNewPrivileges"] = False
    linux = config["linux"]
    linux.pop("seccomp", None)
    linux["maskedPaths"], linux["readonlyPaths"] = [], []
    linux["devices"] = [{"path": "/dev/mem", "type": "c", "major": 1, "minor": 1, "fileMode": 0o640}]
    linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    cli.write(config)

    modules_before = host_modules()
    cid = cli.id("iso")
    proc, out, err = cli.popen("run", "--bundle", str(cli.bundle), cid, name="iso", handler=True)
    t = trace(cli, cid)
    assert proc.wait(timeout=180) == 0, err.read_text()
    assert_gone(t)
    report: dict[str, list[str]] = {}
    for line in out.read_text().splitlines():
        key, _, value = line.partition(" ")
        report.setdefault(key, []).append(value)

    # its own kernel, booted with its own command line
    assert report["kernel"] == [vm_guest.kernel_release] and vm_guest.kernel_release != os.uname().release
    assert report["cmdline"][0] != Path("/proc/cmdline").read_text().strip()
    # no host process: the container's own pid namespace in the guest, a handful of pids from 1
    pids = [int(p) for p in report["pids"][0].split()]
    assert 1 in pids and len(pids) <= 6 and max(pids) < 100, pids
    assert t.qemu not in pids and os.getpid() not in pids and proc.pid not in pids
    # no host file or mount: the host's paths are not there, whatever its mounts are
    assert report["secret"] == ["absent"] and report["found"] == ["0"]
    mounts = [m.split() for m in report["mount"]]
    host_paths = [str(tmp_path), str(Path.cwd()), "/work", "/var/lib/clave", "/run/clave-vm"]
    assert not [m for m in mounts if any(h in " ".join(m) for h in host_paths)], mounts
    root = [m for m in mounts if m[1] == "/"]
    assert root and root[0][0].startswith("/dev/vd"), root  # the rootfs is the guest's block device
    # no host device: the container's /dev is the spec's, plus the /dev/mem it asked for
    devices = set(report["devices"][0].split())
    assert "mem" in devices
    host_disks = {os.path.basename(p) for p in glob.glob("/sys/class/block/*")}
    assert not devices & host_disks, devices & host_disks
    assert devices <= {"null", "zero", "full", "random", "urandom", "tty", "console", "ptmx", "pts", "shm",
                       "mqueue", "fd", "stdin", "stdout", "stderr", "core", "mem"}, devices
    # a module loaded by the container is loaded in the guest's kernel, not the host's
    assert report["insmod"] == ["ok"] and report["module"] == ["1 loaded"], report
    assert host_modules() == modules_before
    assert not os.path.exists("/sys/module/dummy") and not os.path.exists("/sys/class/net/dummy0")
    # /dev/mem is the guest's memory: its BIOS area is not the host's (which has no /dev/mem at all here)
    guest_mem = report["devmem"][0].split()[0]
    assert guest_mem != hashlib.sha256(b"").hexdigest(), "nothing read from the guest's /dev/mem"
    if os.path.exists("/dev/mem"):
        with open("/dev/mem", "rb") as f:
            f.seek(BIOS[0])
            assert hashlib.sha256(f.read(BIOS[1])).hexdigest() != guest_mem
