"""A deterministic cpio "newc" writer (the initramfs format the kernel unpacks).

Entries are written in the order given (callers sort them), with inode numbers assigned in that order and
fixed mtime, uid and gid, so the same tree always gives the same bytes.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

_TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 0
        self._written = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, self._mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._write(header + encoded)
        self._pad()
        self._write(data)
        self._pad()

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self._written % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def add_tree(self, root: str) -> None:
        """Every entry under ``root`` (sorted by path), with its permission bits and nothing else of its metadata."""
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in dirnames + filenames:
                names.append(os.path.relpath(os.path.join(dirpath, n), root))
        for name in sorted(names):
            path = os.path.join(root, name)
            st = os.lstat(path)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                self.directory(name, perm)
            elif stat.S_ISLNK(st.st_mode):
                self.symlink(name, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    self.file(name, f.read(), perm)
            elif stat.S_ISCHR(st.st_mode):
                self.char_device(name, os.major(st.st_rdev), os.minor(st.st_rdev), perm)

    def close(self) -> None:
        self._entry(_TRAILER, 0)
        self._write(b"\0" * (-self._written % 512))
