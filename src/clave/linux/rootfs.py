"""Building a container's root filesystem inside its mount namespace: mounts, devices, pivot_root,
masked and read-only paths. Runs in the container's init, before the user process exists.
"""

from __future__ import annotations

import errno
import os
import stat

from clave.linux import mountinfo
from clave.linux import sys as lsys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# option -> (clear, set) flags; mount(8) names as the runtime spec lists them.
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "ro": (False, lsys.MS_RDONLY), "rw": (True, lsys.MS_RDONLY),
    "nosuid": (False, lsys.MS_NOSUID), "suid": (True, lsys.MS_NOSUID),
    "nodev": (False, lsys.MS_NODEV), "dev": (True, lsys.MS_NODEV),
    "noexec": (False, lsys.MS_NOEXEC), "exec": (True, lsys.MS_NOEXEC),
    "sync": (False, lsys.MS_SYNCHRONOUS), "async": (True, lsys.MS_SYNCHRONOUS),
    "dirsync": (False, lsys.MS_DIRSYNC),
    "remount": (False, lsys.MS_REMOUNT),
    "mand": (False, lsys.MS_MANDLOCK), "nomand": (True, lsys.MS_MANDLOCK),
    "noatime": (False, lsys.MS_NOATIME), "atime": (True, lsys.MS_NOATIME),
    "nodiratime": (False, lsys.MS_NODIRATIME), "diratime": (True, lsys.MS_NODIRATIME),
    "bind": (False, lsys.MS_BIND), "rbind": (False, lsys.MS_BIND | lsys.MS_REC),
    "relatime": (False, lsys.MS_RELATIME), "norelatime": (True, lsys.MS_RELATIME),
    "strictatime": (False, lsys.MS_STRICTATIME), "nostrictatime": (True, lsys.MS_STRICTATIME),
    "lazytime": (False, lsys.MS_LAZYTIME), "nolazytime": (True, lsys.MS_LAZYTIME),
    "silent": (False, lsys.MS_SILENT), "loud": (True, lsys.MS_SILENT),
    "iversion": (False, lsys.MS_I_VERSION), "noiversion": (True, lsys.MS_I_VERSION),
    "nosymfollow": (False, lsys.MS_NOSYMFOLLOW), "symfollow": (True, lsys.MS_NOSYMFOLLOW),
}
PROPAGATION_OPTIONS: dict[str, int] = {
    "private": lsys.MS_PRIVATE, "rprivate": lsys.MS_PRIVATE | lsys.MS_REC,
    "shared": lsys.MS_SHARED, "rshared": lsys.MS_SHARED | lsys.MS_REC,
    "slave": lsys.MS_SLAVE, "rslave": lsys.MS_SLAVE | lsys.MS_REC,
    "unbindable": lsys.MS_UNBINDABLE, "runbindable": lsys.MS_UNBINDABLE | lsys.MS_REC,
}
# Options that change only how the mount is set up, not the kernel flags or data.
_IGNORED_OPTIONS = {"defaults", "tmpcopyup", "idmap", "ridmap"}

# The devices every container gets (runtime-spec "Default Devices").
DEFAULT_DEVICES = [
    # path, type, major, minor, mode
    ("/dev/null", "c", 1, 3, 0o666),
    ("/dev/zero", "c", 1, 5, 0o666),
    ("/dev/full", "c", 1, 7, 0o666),
    ("/dev/random", "c", 1, 8, 0o666),
    ("/dev/urandom", "c", 1, 9, 0o666),
    ("/dev/tty", "c", 5, 0, 0o666),
]
_DEV_SYMLINKS = [
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
]


class RootfsError(Exception):
    """A mount or device could not be set up; one line naming it."""


def parse_options(options: list[str]) -> tuple[int, int, str]:
    """-> (mount flags, propagation flags, data string)."""
    flags = 0
    propagation = 0
    data = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            clear, bit = _FLAG_OPTIONS[opt]
            flags = flags & ~bit if clear else flags | bit
        elif opt in PROPAGATION_OPTIONS:
            propagation |= PROPAGATION_OPTIONS[opt]
        elif opt in _IGNORED_OPTIONS:
            continue
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def secure_join(root: str, unsafe: str) -> str:
    """Resolve ``unsafe`` as if ``root`` were ``/``: symlinks are followed inside root and ``..`` stops at root.

    Missing components are kept as they are (they will be created), so the result never leaves root.
    """
    parts = [p for p in unsafe.split("/") if p and p != "."]
    resolved: list[str] = []
    links_followed = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links_followed += 1
            if links_followed > 255:
                raise RootfsError(f"too many symlinks resolving {unsafe}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


# Symlinks are followed inside the root, ".." stops at it, and magic links (/proc/self/fd/N, /proc/PID/root,
# /proc/PID/exe) are refused: a path in a container's config or image can never lead to the host.
_IN_ROOT = lsys.RESOLVE_IN_ROOT | lsys.RESOLVE_NO_MAGICLINKS


def open_root(root: str) -> int:
    """An O_PATH fd of a container root (the rootfs before pivot_root, "/" after), for ``resolve``."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def fd_path(fd: int) -> str:
    """The path that names exactly what ``fd`` is open on, for calls that take only paths (mount)."""
    return f"/proc/self/fd/{fd}"


def resolve(root_fd: int, path: str, create: str = "", flags: int = 0) -> int:
    """An O_PATH fd (plus ``flags``) of ``path`` resolved inside the root ``root_fd`` (see _IN_ROOT).

    ``create`` ("dir" or "file") makes what is missing, parents as directories: one component at a time, each
    resolved from the root again, so a symlink swapped in meanwhile by another container sharing a volume still
    cannot lead out. What is then mounted on the returned fd is what was resolved, not what a path names later.
    """
    rel = path.strip("/") or "."
    try:
        return _open_in(root_fd, rel, flags)
    except FileNotFoundError:
        if not create:
            raise
    # Create along the path with the symlinks that exist resolved inside the root (as a securejoin would),
    # so a link to a missing directory gets its target made inside, never outside.
    top = fd_path(root_fd)
    inner = os.path.relpath(secure_join(top, rel), top)
    parts = [p for p in inner.split("/") if p not in ("", ".")]
    for i, name in enumerate(parts):
        parent = _open_in(root_fd, "/".join(parts[:i]) or ".", os.O_DIRECTORY)
        try:
            if i == len(parts) - 1 and create == "file":
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755, dir_fd=parent))
            else:
                os.mkdir(name, 0o755, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.EISDIR, errno.ELOOP):
                raise
        finally:
            os.close(parent)
    return _open_in(root_fd, rel, flags)


def _open_in(root_fd: int, rel: str, flags: int = 0) -> int:
    try:
        return lsys.openat2(root_fd, rel, os.O_PATH | flags, _IN_ROOT)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise RootfsError("this kernel lacks openat2(2) (Linux 5.6): clave cannot resolve container paths "
                              "safely") from None
        raise


def prepare_propagation(rootfs: str, propagation: str | None, own_namespace: bool = True) -> None:
    """Make the container's view of the host's mounts non-shared (rslave unless configured), then make
    the rootfs a mount point so pivot_root can use it.

    In a mount namespace inherited from the runtime (none in linux.namespaces) the mounts are the host's own:
    their propagation is left alone and the rootfs bind is the one mount ``detach_rootfs`` removes at delete.
    """
    flag = PROPAGATION_OPTIONS[propagation] if propagation else lsys.MS_SLAVE | lsys.MS_REC
    if flag & lsys.MS_UNBINDABLE:
        # An unbindable root cannot be bound onto the rootfs: unbindable is applied to the new root once it is
        # the root (finish_propagation), as crun does; until then the host's mounts are seen as rslave.
        flag = lsys.MS_SLAVE | lsys.MS_REC
    if own_namespace:
        lsys.mount(None, "/", None, flag)
    lsys.mount(rootfs, rootfs, "bind", lsys.MS_BIND | lsys.MS_REC)
    if not own_namespace:
        return
    # pivot_root refuses a shared parent mount. Made private only now, the rootfs keeps the requested
    # propagation (a bind of a shared mount joins its peer group).
    parent = _parent_mount_point(rootfs)
    if parent is not None:
        lsys.mount(None, parent, None, lsys.MS_PRIVATE)


def finish_propagation(propagation: str | None) -> None:
    """After the root switch: rootfsPropagation unbindable / runbindable, which could not be set before."""
    if propagation in ("unbindable", "runbindable"):
        lsys.mount(None, "/", None, PROPAGATION_OPTIONS[propagation])


def top_mount_id(path: str) -> str | None:
    """The id of the topmost mount at ``path`` (None when ``path`` is no mount point)."""
    top = _top_mount(os.path.realpath(path), mountinfo.entries())
    return top.id if top is not None else None


def detach_rootfs(rootfs: str, before: str | None) -> None:
    """Undo a container's mounts made in an inherited mount namespace: its rootfs bind (and everything under
    it) is the topmost mount at ``rootfs`` when that is no longer the mount recorded ``before`` create."""
    path = os.path.realpath(rootfs)
    current = top_mount_id(path)
    if current is not None and current != before:
        try:
            lsys.umount(path, lsys.MNT_DETACH)
        except OSError as exc:
            raise RootfsError(f"unmount {path}: {exc.strerror}") from None


def filesystem_type(path: str, table: str = "/proc/self/mountinfo") -> str:
    """The type of the file system holding ``path``: that of the last-mounted, longest mount point above it
    (in ``table``: another process's mountinfo gives it in that process's view)."""
    real = os.path.realpath(path) if table == "/proc/self/mountinfo" else os.path.normpath(path)
    best, kind = "", ""
    for entry in mountinfo.entries(table):
        point = entry.point
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, entry.fstype
    return kind


def _is_shared(entry: mountinfo.MountEntry) -> bool:
    return any(field.startswith("shared:") for field in entry.optional)


def _top_mount(path: str, entries: list[mountinfo.MountEntry]) -> mountinfo.MountEntry | None:
    on_path = [e for e in entries if e.point == path]
    return on_path[-1] if on_path else None


def _parent_mount_point(path: str) -> str | None:
    """The mount point under the topmost mount at ``path``, if that parent mount is shared."""
    entries = mountinfo.entries()
    top = _top_mount(path, entries)
    parent = next((e for e in entries if top is not None and e.id == top.parent), None)
    if parent is None or not _is_shared(parent):
        return None
    return parent.point


def mount_all(rootfs: str, mounts: list[dict[str, Any]], cgroup_paths: dict[str, str], in_userns: bool,
              before_cgroup: Callable[[], None] | None = None) -> None:
    """The config's mounts in order; ``before_cgroup()`` runs once before the first cgroup mount (the
    container's cgroups must exist, and its cgroup namespace be made, before it shows them)."""
    root_fd = open_root(rootfs)
    try:
        for m in mounts:
            if before_cgroup is not None and m.get("type") == "cgroup":
                before_cgroup()
                before_cgroup = None
            try:
                mount_one(root_fd, m, cgroup_paths, in_userns)
            except OSError as exc:
                raise RootfsError(
                    f"mount {m.get('source') or m.get('type', '')} to {m['destination']}: "
                    f"{os.strerror(exc.errno or 0)}"
                ) from None
    finally:
        os.close(root_fd)


def mount_one(root_fd: int, m: dict[str, Any], cgroup_paths: dict[str, str], in_userns: bool) -> None:
    """One OCI mount, onto its destination resolved inside the root (never a path re-resolved later)."""
    mtype = m.get("type", "")
    source = m.get("source", "")
    flags, propagation, data = parse_options(m.get("options", []))
    dest = m["destination"]
    is_bind = bool(flags & lsys.MS_BIND) or mtype == "bind"

    if is_bind:
        if not source.startswith("/"):
            source = os.path.join(os.getcwd(), source)
        try:
            source_stat = os.stat(source)
        except OSError as exc:
            raise RootfsError(f"bind mount source {source}: {exc.strerror}") from None
        _mount_at(root_fd, dest, source, None, lsys.MS_BIND | (flags & lsys.MS_REC),
                  create="dir" if stat.S_ISDIR(source_stat.st_mode) else "file")
        mounted = _check_mounted(root_fd, dest, source_stat)
        try:
            # A bind mount ignores other flags until remounted.
            extra = flags & ~(lsys.MS_BIND | lsys.MS_REC | lsys.MS_REMOUNT)
            if extra:
                if in_userns:
                    extra |= _locked_flags(mounted)
                lsys.mount(None, fd_path(mounted), None, lsys.MS_BIND | lsys.MS_REMOUNT | extra)
            if propagation:
                lsys.mount(None, fd_path(mounted), None, propagation)
        finally:
            os.close(mounted)
        return
    if mtype == "cgroup":
        _mount_cgroup(root_fd, dest, flags, cgroup_paths)
    elif mtype == "sysfs" and in_userns:
        # sysfs cannot be mounted from a user namespace that does not own the net ns: bind it.
        _mount_at(root_fd, dest, "/sys", None, lsys.MS_BIND | lsys.MS_REC, create="dir")
    else:
        _mount_at(root_fd, dest, source or mtype, mtype, flags, data or None, create="dir")
    if propagation:
        _mount_at(root_fd, dest, None, None, propagation)


def _mount_at(root_fd: int, path: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None, create: str = "") -> None:
    """mount(2) onto ``path`` as resolved inside the root (see ``resolve``) right now, through its fd."""
    target = resolve(root_fd, path, create)
    try:
        lsys.mount(source, fd_path(target), fstype, flags, data)
    finally:
        os.close(target)


def _check_mounted(root_fd: int, dest: str, source_stat: os.stat_result) -> int:
    """Resolve ``dest`` again, now through the new mount, and check it is the bind of ``source``: what was
    mounted over is what was meant. Returns the mount's O_PATH fd (for remounts)."""
    fd = resolve(root_fd, dest)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (source_stat.st_dev, source_stat.st_ino):
        os.close(fd)
        raise RootfsError(f"mount to {dest}: the destination changed while it was mounted (a symlink swapped in "
                          "a shared volume?); refusing to go on")
    return fd


def _locked_flags(path: str | int) -> int:
    """Flags the kernel locks on a mount made in a less privileged user namespace must be kept on remount."""
    st = os.statvfs(fd_path(path) if isinstance(path, int) else path)
    flags = 0
    for bit, vfs in ((lsys.MS_RDONLY, os.ST_RDONLY), (lsys.MS_NOSUID, os.ST_NOSUID),
                     (lsys.MS_NODEV, os.ST_NODEV), (lsys.MS_NOEXEC, os.ST_NOEXEC)):
        if st.f_flag & vfs:
            flags |= bit
    return flags


def _mount_cgroup(root_fd: int, dest: str, flags: int, cgroup_paths: dict[str, str]) -> None:
    """Show the container its own cgroups: cgroup2 directly, or for v1 a tmpfs of read-only binds."""
    v1 = {name: path for name, path in cgroup_paths.items() if name not in ("unified", "")}
    if not v1:
        _mount_at(root_fd, dest, "cgroup2", "cgroup2", flags, create="dir")
        return
    _mount_at(root_fd, dest, "tmpfs", "tmpfs", lsys.MS_NOSUID | lsys.MS_NODEV | lsys.MS_NOEXEC, "mode=755",
              create="dir")
    bind_flags = lsys.MS_BIND | lsys.MS_REMOUNT | lsys.MS_NOSUID | lsys.MS_NODEV | lsys.MS_NOEXEC
    binds = sorted(v1.items()) + ([("unified", cgroup_paths["unified"])] if cgroup_paths.get("unified") else [])
    for name, path in binds:
        _mount_at(root_fd, f"{dest}/{name}", path, None, lsys.MS_BIND, create="dir")
        if name != "unified":
            _mount_at(root_fd, f"{dest}/{name}", None, None, bind_flags | (flags & lsys.MS_RDONLY))
    if flags & lsys.MS_RDONLY:
        _mount_at(root_fd, dest, None, None, lsys.MS_REMOUNT | lsys.MS_RDONLY | lsys.MS_NOSUID | lsys.MS_NODEV
                  | lsys.MS_NOEXEC, "mode=755")


def create_devices(rootfs: str, devices: list[dict[str, Any]], in_userns: bool) -> None:
    """Default devices plus linux.devices: mknod, or bind the host's node inside a user namespace. Every node
    and link is made through its parent directory's fd, resolved inside the root."""
    wanted: dict[str, dict[str, Any]] = {
        path: {"path": path, "type": t, "major": ma, "minor": mi, "fileMode": mode}
        for path, t, ma, mi, mode in DEFAULT_DEVICES
    }
    for dev in devices:
        wanted[dev["path"]] = dev
    root_fd = open_root(rootfs)
    old_umask = os.umask(0)
    try:
        for dev in wanted.values():
            try:
                _make_device(root_fd, dev, in_userns)
            except OSError as exc:
                raise RootfsError(f"create device {dev['path']}: {exc.strerror}") from None
        for target, link in _DEV_SYMLINKS + [("pts/ptmx", "/dev/ptmx")]:
            parent, name = _parent_of(root_fd, link)
            try:
                if link == "/dev/ptmx" and _lexists(name, parent) and not _is_link(name, parent):
                    os.unlink(name, dir_fd=parent)
                if not _lexists(name, parent):
                    os.symlink(target, name, dir_fd=parent)
            finally:
                os.close(parent)
    finally:
        os.umask(old_umask)
        os.close(root_fd)


def _parent_of(root_fd: int, path: str) -> tuple[int, str]:
    """(fd of the parent directory resolved inside the root, created if missing; the last name)."""
    parent, name = os.path.split(os.path.normpath("/" + path))
    if name in ("", ".", ".."):
        raise RootfsError(f"{path}: not a path to a file")
    return resolve(root_fd, parent, "dir", os.O_DIRECTORY), name


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_link(name: str, dir_fd: int) -> bool:
    return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def _make_device(root_fd: int, dev: dict[str, Any], in_userns: bool) -> None:
    kind = dev["type"]
    mode = dev.get("fileMode", 0o666) & 0o7777
    parent, name = _parent_of(root_fd, dev["path"])
    try:
        if in_userns and kind != "p":
            # mknod of device nodes is not allowed in a user namespace: bind the host node.
            if not _lexists(name, parent):
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent))
            target = _open_in(parent, name, os.O_NOFOLLOW)
            try:
                lsys.mount(dev["path"], fd_path(target), None, lsys.MS_BIND)
            finally:
                os.close(target)
            return
        if _lexists(name, parent):
            os.unlink(name, dir_fd=parent)
        type_bits = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[kind]
        rdev = os.makedev(dev.get("major", 0), dev.get("minor", 0)) if kind != "p" else 0
        os.mknod(name, type_bits | mode, rdev, dir_fd=parent)
        os.chown(name, dev.get("uid", 0), dev.get("gid", 0), dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def pivot_root(rootfs: str) -> None:
    """Switch to rootfs and detach the host's root so nothing of it stays reachable. The rootfs keeps its
    propagation (rootfsPropagation), though pivot_root refuses a shared one: it is private meanwhile."""
    top = _top_mount(rootfs, mountinfo.entries())
    shared = top is not None and _is_shared(top)
    if shared:
        lsys.mount(None, rootfs, None, lsys.MS_PRIVATE)
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.chdir(rootfs)
        lsys.pivot_root(".", ".")
        # The old root now sits on top of the new one. "." must name it, not the new root (a path walk
        # of "." does not cross mounts): keep its unmounts from reaching the host, then detach it.
        os.fchdir(old_root)
        lsys.mount(None, ".", None, lsys.MS_SLAVE | lsys.MS_REC)
        lsys.umount(".", lsys.MNT_DETACH)
    finally:
        os.close(old_root)
    os.chdir("/")
    if shared:
        lsys.mount(None, "/", None, lsys.MS_SHARED)


def chroot_root(rootfs: str) -> None:
    """Switch root in a mount namespace shared with the runtime (runc and crun chroot there too): pivot_root or
    a move onto / would change the host's own root."""
    os.chdir(rootfs)
    os.chroot(".")
    os.chdir("/")


def move_root(rootfs: str) -> None:
    """--no-pivot: move the rootfs onto / and chroot (for ramfs roots where pivot_root is impossible)."""
    os.chdir(rootfs)
    lsys.mount(rootfs, "/", None, lsys.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def readonly_root() -> None:
    lsys.mount(None, "/", None, lsys.MS_BIND | lsys.MS_REMOUNT | lsys.MS_RDONLY | _locked_flags("/"))


def mask_paths(rootfs: str, paths: list[str]) -> None:
    """Hide files behind the container's /dev/null and directories behind an empty read-only tmpfs.

    Done before pivot_root, through fds resolved inside the root: /dev/null must really be the null device
    (a symlink or another node put there is refused, CVE-2025-31133), and each masked path is mounted on as
    resolved, so a swapped symlink cannot redirect the mask."""
    if not paths:
        return
    root_fd = open_root(rootfs)
    try:
        null = _open_in(root_fd, "dev/null", os.O_NOFOLLOW)
        try:
            st = os.fstat(null)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
                raise RootfsError("/dev/null in the container is not the null device (1:3): refusing to mask with it")
            for path in paths:
                try:
                    target = resolve(root_fd, path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise RootfsError(f"mask {path}: {exc.strerror}") from None
                try:
                    if stat.S_ISDIR(os.fstat(target).st_mode):
                        lsys.mount("tmpfs", fd_path(target), "tmpfs", lsys.MS_RDONLY)
                    else:
                        lsys.mount(fd_path(null), fd_path(target), None, lsys.MS_BIND)
                except OSError as exc:
                    raise RootfsError(f"mask {path}: {os.strerror(exc.errno or 0)}") from None
                finally:
                    os.close(target)
        finally:
            os.close(null)
    finally:
        os.close(root_fd)


def readonly_paths(rootfs: str, paths: list[str]) -> None:
    """Bind each path onto itself read-only (before pivot_root, through fds resolved inside the root)."""
    if not paths:
        return
    root_fd = open_root(rootfs)
    try:
        for path in paths:
            try:
                target = resolve(root_fd, path)
            except FileNotFoundError:
                continue
            try:
                try:
                    lsys.mount(fd_path(target), fd_path(target), None, lsys.MS_BIND | lsys.MS_REC)
                finally:
                    os.close(target)
                mounted = resolve(root_fd, path)  # now the new bind mount
                try:
                    lsys.mount(None, fd_path(mounted), None,
                               lsys.MS_BIND | lsys.MS_REMOUNT | lsys.MS_RDONLY | _locked_flags(mounted))
                finally:
                    os.close(mounted)
            except OSError as exc:
                raise RootfsError(f"make {path} read-only: {os.strerror(exc.errno or 0)}") from None
    finally:
        os.close(root_fd)
