"""Host directories shared with a guest over virtio-fs, one QEMU-bundled ``virtiofsd`` per directory.

A container's bind-mounted host directories (volumes) reach its guest live: each gets a virtiofsd serving that
directory alone (its own mount namespace, pivoted into it: nothing else of the host is reachable) on a
vhost-user socket in the VM's state directory, and a ``vhost-user-fs`` device with a tag the agent mounts. QEMU
needs the guest's memory shareable for vhost-user (``memory-backend-memfd,share=on``), which is also why such a
VM cannot be a template's clone. virtiofsd exits when QEMU goes; destroy kills what is left by recorded pid.
"""

from __future__ import annotations

import os
import subprocess
import time

from clave.vm.errors import VmError

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


class Share:
    """A host directory given to the guest as virtio-fs under ``tag``."""

    def __init__(self, source: str, tag: str) -> None:
        if not os.path.isdir(source):
            raise VmError(f"shared directory {source} does not exist")
        self.source = os.path.abspath(source)
        self.tag = tag


def socket_name(index: int) -> str:
    return f"fs{index}.sock"


def start(state_dir: str, index: int, share: Share, log: str, timeout: float = 5.0) -> subprocess.Popen[bytes]:
    """Start the virtiofsd of ``share`` and wait until its socket is there (QEMU connects to it)."""
    if not os.access(VIRTIOFSD, os.X_OK):
        raise VmError(f"{VIRTIOFSD} not found: install Debian's qemu-system-x86")
    path = os.path.join(state_dir, socket_name(index))
    with open(log, "ab") as out:
        proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={path}", "-o", f"source={share.source}", "-o",
                                 "cache=auto", "-o", "sandbox=namespace", "-o", "no_posix_lock"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                close_fds=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise VmError(f"virtiofsd for {share.source} did not start (see {log})")
        time.sleep(0.005)
    return proc


def qemu_args(state_dir: str, shares: list[Share], memory_mib: int, mmio: bool) -> list[str]:
    """Shareable guest memory and one vhost-user-fs device per share."""
    bus = "device" if mmio else "pci"
    args = ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on", "-machine", "memory-backend=mem"]
    if mmio:
        args += ["-global", "virtio-mmio.force-legacy=false"]
    for i, share in enumerate(shares):
        args += ["-chardev", f"socket,id=fs{i},path={os.path.join(state_dir, socket_name(i))}",
                 "-device", f"vhost-user-fs-{bus},chardev=fs{i},tag={share.tag}"]
    return args
