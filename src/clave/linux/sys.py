"""Thin wrappers over the Linux system calls Python 3.11 lacks (mount, pivot_root, unshare, setns...).

libc is loaded once, on first use; every wrapper raises OSError with errno and a path/what in the message.
"""

from __future__ import annotations

import os

from clave.linux import ffi  # not ctypes: see that module

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ctypes import CDLL


def libc() -> CDLL:
    return ffi.libc()


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ffi.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_I_VERSION = 0x800000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000
MNT_DETACH = 0x2

# clone(2) / unshare(2) namespace flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_SYS_PIVOT_ROOT = 155  # x86_64
_SYS_SETNS = 308
_SYS_UNSHARE = 272
_SYS_CLOSE_RANGE = 436  # the same number on every architecture (the generic table)
_SYS_OPENAT2 = 437

# openat2(2) resolve flags
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
CLOSE_RANGE_CLOEXEC = 0x4
PROC_SUPER_MAGIC = 0x9FA0


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        libc().mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ffi.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype or ''} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(libc().umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(libc().syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(libc().setns(fd, nstype), "setns")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        libc().prctl(option, ffi.c_ulong(arg2), ffi.c_ulong(arg3), ffi.c_ulong(arg4), ffi.c_ulong(arg5)),
        f"prctl({option})",
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(libc().sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(libc().setdomainname(raw, len(raw)), "setdomainname")


class _OpenHow(ffi.Structure):
    _fields_ = [("flags", ffi.c_uint64), ("mode", ffi.c_uint64), ("resolve", ffi.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dir_fd`` under the RESOLVE_* rules -> fd (close-on-exec added).
    Raises OSError like os.open (ENOSYS on kernels before 5.6)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = libc().syscall(_SYS_OPENAT2, ffi.c_int(dir_fd), path.encode(), ffi.byref(how),
                        ffi.c_size_t(ffi.sizeof(how)))
    if fd < 0:
        err = ffi.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def cloexec_from(first: int) -> None:
    """Mark every fd >= ``first`` close-on-exec in one call (close_range(2), Linux 5.11), without /proc."""
    _check(libc().syscall(_SYS_CLOSE_RANGE, ffi.c_uint(first), ffi.c_uint(0xFFFFFFFF),
                          ffi.c_uint(CLOSE_RANGE_CLOEXEC)), "close_range")


class _StatFs(ffi.Structure):
    _fields_ = [("f_type", ffi.c_long), ("_rest", ffi.c_long * 15)]


def fs_type(fd: int) -> int:
    """The file system magic of what ``fd`` is open on (fstatfs(2) f_type)."""
    buf = _StatFs()
    _check(libc().fstatfs(fd, ffi.byref(buf)), "fstatfs")
    return int(buf.f_type)


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)

from clave.linux.signals import SIGKILL, SIGTERM  # noqa: E402,F401  (re-exported for the process layers)
