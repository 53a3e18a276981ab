"""A container's rootfs as a block device: one read-only ext4 image per image content, one writable layer per
container.

The base image is made from the bundle's rootfs directory with ``mkfs.ext4 -d`` (no loop mount, no root-only
kernel state) and cached under ``VM_ROOT/rootfs/<digest>.img``, where the digest covers every entry's path,
type, mode, owner, size and content (and a symlink's target): the same image content gives the same file, so
a hundred containers of one image share one base. A container writes to its own qcow2 layer backed by the base
(``qemu-img create -b``), kept in its VM's state directory: its writes live there and are gone with the
container at delete. A read-only root (``root.readonly``) gets a layer too: the guest makes its mount points,
then remounts it read-only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import subprocess

from clave.vm import paths
from clave.vm.errors import VmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

ROOTFS_CACHE = os.path.join(paths.VM_ROOT, "rootfs")
RECIPE = b"clave-rootfs-1"
# Free space the container's layer can fill, beyond the image's own content (the file is sparse: unused
# blocks cost nothing on the host).
WRITABLE_MIB = 1024
MIN_MIB = 64


class RootfsError(VmError):
    """The rootfs directory could not be made into an image."""


def tree_digest(root: str) -> tuple[str, int]:
    """(sha256 over every entry of ``root``, total bytes of its regular files). Entries are visited in sorted
    order and hard links are hashed once, so the digest depends on the content alone."""
    h = hashlib.sha256(RECIPE)
    total = 0
    seen: dict[tuple[int, int], str] = {}

    def visit(path: str, rel: str) -> None:
        nonlocal total
        st = os.lstat(path)
        h.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode)}\0{st.st_uid}\0{st.st_gid}\0"
                 .encode(errors="surrogateescape"))
        if stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(path)) + b"\0")
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                h.update(b"link\0" + seen[key].encode(errors="surrogateescape") + b"\0")
                return
            seen[key] = rel
            total += st.st_size
            h.update(f"{st.st_size}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            h.update(f"{st.st_rdev}\0".encode())
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), f"{rel}/{name}")

    try:
        visit(root, "")
    except OSError as exc:
        raise RootfsError(f"rootfs {root}: {exc.filename}: {exc.strerror}") from None
    return h.hexdigest(), total


def base_image(rootfs: str, progress: Callable[[str], None] | None = None) -> str:
    """The cached read-only ext4 image of ``rootfs``'s content, made on first use (serialised per digest, so
    concurrent creates of one image make it once)."""
    if not os.path.isdir(rootfs):
        raise RootfsError(f"rootfs {rootfs} is not a directory")
    digest, content = tree_digest(rootfs)
    os.makedirs(ROOTFS_CACHE, mode=0o700, exist_ok=True)
    image = os.path.join(ROOTFS_CACHE, f"{digest}.img")
    lock_fd = os.open(f"{image}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if os.path.exists(image):
            return image
        if progress is not None:
            progress(f"making the rootfs image of {rootfs} ({content >> 20} MiB)")
        size_mib = max(MIN_MIB, content * 5 // 4 // (1 << 20) + WRITABLE_MIB)
        tmp = f"{image}.tmp"
        # Fixed UUID and hash seed from the digest: the same content makes the same image.
        uuid = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        done = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", rootfs, "-U", uuid, "-E", f"hash_seed={uuid},root_owner=0:0",
             "-O", "^has_journal", tmp, f"{size_mib}M"],
            capture_output=True, text=True, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
        if done.returncode != 0:
            _unlink(tmp)
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            raise RootfsError(f"mkfs.ext4 -d {rootfs}: {last}")
        os.chmod(tmp, 0o400)
        os.rename(tmp, image)
        return image
    finally:
        os.close(lock_fd)


def writable_layer(base: str, path: str) -> str:
    """A qcow2 layer over ``base`` at ``path``: the container's writes go there, the base stays untouched."""
    done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _unlink(path)
        raise RootfsError(f"qemu-img create {path}: {done.stderr.strip() or 'failed'}")
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
