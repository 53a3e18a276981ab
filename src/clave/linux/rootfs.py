"""Building a container's root filesystem inside its mount namespace: mounts, devices, pivot_root,
masked and read-only paths. Runs in the container's init, before the user process exists.
"""

from __future__ import annotations

import errno
import os
import stat

from clave.linux import sys as lsys

TYPE_CHECKING = False
if TYPE_CHECKING:
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


def _mkdir_all(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)


def _create_target(dest: str, source_is_dir: bool) -> None:
    if source_is_dir:
        _mkdir_all(dest)
        return
    _mkdir_all(os.path.dirname(dest))
    if not os.path.lexists(dest):
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o755))


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
    top = _top_mount(os.path.realpath(path), _mountinfo())
    return top[0] if top is not None else None


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


def _mountinfo_records() -> list[tuple[list[str], list[str]]]:
    """/proc/self/mountinfo, each line as its fields before the " - " separator (id, parent id, dev, root, mount
    point, options, optional fields) and after it (fs type, source, super options)."""
    with open("/proc/self/mountinfo") as f:
        return [(head.split(), tail.split()) for head, _, tail in (line.partition(" - ") for line in f)]


def _mountinfo() -> list[list[str]]:
    return [head for head, _ in _mountinfo_records()]


def filesystem_type(path: str) -> str:
    """The type of the file system holding ``path``: that of the last-mounted, longest mount point above it."""
    real = os.path.realpath(path)
    best, kind = "", ""
    for head, tail in _mountinfo_records():
        point = _unescape(head[4])
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, tail[0]
    return kind


def _is_shared(entry: list[str]) -> bool:
    return any(field.startswith("shared:") for field in entry[6:])


def _top_mount(path: str, entries: list[list[str]]) -> list[str] | None:
    on_path = [e for e in entries if _unescape(e[4]) == path]
    return on_path[-1] if on_path else None


def _parent_mount_point(path: str) -> str | None:
    """The mount point under the topmost mount at ``path``, if that parent mount is shared."""
    entries = _mountinfo()
    top = _top_mount(path, entries)
    parent = next((e for e in entries if top is not None and e[0] == top[1]), None)
    if parent is None or not _is_shared(parent):
        return None
    return _unescape(parent[4])


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def mount_all(rootfs: str, mounts: list[dict[str, Any]], cgroup_paths: dict[str, str], in_userns: bool) -> None:
    for m in mounts:
        try:
            mount_one(rootfs, m, cgroup_paths, in_userns)
        except OSError as exc:
            raise RootfsError(
                f"mount {m.get('source') or m.get('type', '')} to {m['destination']}: {os.strerror(exc.errno or 0)}"
            ) from None


def mount_one(rootfs: str, m: dict[str, Any], cgroup_paths: dict[str, str], in_userns: bool) -> None:
    mtype = m.get("type", "")
    source = m.get("source", "")
    flags, propagation, data = parse_options(m.get("options", []))
    dest = secure_join(rootfs, m["destination"])
    is_bind = bool(flags & lsys.MS_BIND) or mtype == "bind"

    if is_bind:
        if not source.startswith("/"):
            source = os.path.join(os.getcwd(), source)
        try:
            source_is_dir = os.path.isdir(source)
            os.stat(source)
        except OSError as exc:
            raise RootfsError(f"bind mount source {source}: {exc.strerror}") from None
        _create_target(dest, source_is_dir)
        bind_flags = lsys.MS_BIND | (flags & lsys.MS_REC)
        lsys.mount(source, dest, None, bind_flags)
        # A bind mount ignores other flags until remounted.
        extra = flags & ~(lsys.MS_BIND | lsys.MS_REC | lsys.MS_REMOUNT)
        if extra:
            if in_userns:
                extra |= _locked_flags(dest)
            lsys.mount(None, dest, None, lsys.MS_BIND | lsys.MS_REMOUNT | extra)
    elif mtype == "cgroup":
        _mount_cgroup(dest, flags, cgroup_paths)
    else:
        _mkdir_all(dest)
        if mtype == "sysfs" and in_userns:
            # sysfs cannot be mounted from a user namespace that does not own the net ns: bind it.
            lsys.mount("/sys", dest, None, lsys.MS_BIND | lsys.MS_REC)
        else:
            lsys.mount(source or mtype, dest, mtype, flags, data or None)
    if propagation:
        lsys.mount(None, dest, None, propagation)


def _locked_flags(path: str) -> int:
    """Flags the kernel locks on a mount made in a less privileged user namespace must be kept on remount."""
    st = os.statvfs(path)
    flags = 0
    for bit, vfs in ((lsys.MS_RDONLY, os.ST_RDONLY), (lsys.MS_NOSUID, os.ST_NOSUID),
                     (lsys.MS_NODEV, os.ST_NODEV), (lsys.MS_NOEXEC, os.ST_NOEXEC)):
        if st.f_flag & vfs:
            flags |= bit
    return flags


def _mount_cgroup(dest: str, flags: int, cgroup_paths: dict[str, str]) -> None:
    """Show the container its own cgroups: cgroup2 directly, or for v1 a tmpfs of read-only binds."""
    _mkdir_all(dest)
    v1 = {name: path for name, path in cgroup_paths.items() if name not in ("unified", "")}
    if not v1:
        lsys.mount("cgroup2", dest, "cgroup2", flags)
        return
    lsys.mount("tmpfs", dest, "tmpfs", lsys.MS_NOSUID | lsys.MS_NODEV | lsys.MS_NOEXEC, "mode=755")
    bind_flags = lsys.MS_BIND | lsys.MS_REMOUNT | lsys.MS_NOSUID | lsys.MS_NODEV | lsys.MS_NOEXEC
    for name, path in sorted(v1.items()):
        target = os.path.join(dest, name)
        _mkdir_all(target)
        lsys.mount(path, target, None, lsys.MS_BIND)
        lsys.mount(None, target, None, bind_flags | (flags & lsys.MS_RDONLY))
    unified = cgroup_paths.get("unified")
    if unified:
        target = os.path.join(dest, "unified")
        _mkdir_all(target)
        lsys.mount(unified, target, None, lsys.MS_BIND)
    if flags & lsys.MS_RDONLY:
        lsys.mount(None, dest, None, lsys.MS_REMOUNT | lsys.MS_RDONLY | lsys.MS_NOSUID | lsys.MS_NODEV
                   | lsys.MS_NOEXEC, "mode=755")


def create_devices(rootfs: str, devices: list[dict[str, Any]], in_userns: bool) -> None:
    """Default devices plus linux.devices: mknod, or bind the host's node inside a user namespace."""
    wanted: dict[str, dict[str, Any]] = {
        path: {"path": path, "type": t, "major": ma, "minor": mi, "fileMode": mode}
        for path, t, ma, mi, mode in DEFAULT_DEVICES
    }
    for dev in devices:
        wanted[dev["path"]] = dev
    old_umask = os.umask(0)
    try:
        for dev in wanted.values():
            _make_device(rootfs, dev, in_userns)
        for target, link in _DEV_SYMLINKS:
            dest = secure_join(rootfs, link)
            if not os.path.lexists(dest):
                os.symlink(target, dest)
        ptmx = secure_join(rootfs, "/dev/ptmx")
        if os.path.lexists(ptmx) and not os.path.islink(ptmx):
            os.unlink(ptmx)
        if not os.path.lexists(ptmx):
            os.symlink("pts/ptmx", ptmx)
    finally:
        os.umask(old_umask)


def _make_device(rootfs: str, dev: dict[str, Any], in_userns: bool) -> None:
    dest = secure_join(rootfs, dev["path"])
    _mkdir_all(os.path.dirname(dest))
    kind = dev["type"]
    mode = dev.get("fileMode", 0o666) & 0o7777
    try:
        if in_userns and kind != "p":
            # mknod of device nodes is not allowed in a user namespace: bind the host node.
            if not os.path.lexists(dest):
                os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
            lsys.mount(dev["path"], dest, None, lsys.MS_BIND)
            return
        if os.path.lexists(dest):
            os.unlink(dest)
        type_bits = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[kind]
        rdev = os.makedev(dev.get("major", 0), dev.get("minor", 0)) if kind != "p" else 0
        os.mknod(dest, type_bits | mode, rdev)
        os.chown(dest, dev.get("uid", 0), dev.get("gid", 0))
    except OSError as exc:
        raise RootfsError(f"create device {dev['path']}: {exc.strerror}") from None


def pivot_root(rootfs: str) -> None:
    """Switch to rootfs and detach the host's root so nothing of it stays reachable. The rootfs keeps its
    propagation (rootfsPropagation), though pivot_root refuses a shared one: it is private meanwhile."""
    top = _top_mount(rootfs, _mountinfo())
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


def mask_paths(paths: list[str]) -> None:
    """Hide files behind /dev/null and directories behind an empty read-only tmpfs (after pivot_root)."""
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                lsys.mount("tmpfs", path, "tmpfs", lsys.MS_RDONLY)
            else:
                lsys.mount("/dev/null", path, None, lsys.MS_BIND)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise RootfsError(f"mask {path}: {exc.strerror}") from None


def readonly_paths(paths: list[str]) -> None:
    for path in paths:
        try:
            lsys.mount(path, path, None, lsys.MS_BIND | lsys.MS_REC)
            lsys.mount(None, path, None, lsys.MS_BIND | lsys.MS_REMOUNT | lsys.MS_RDONLY | _locked_flags(path))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise RootfsError(f"make {path} read-only: {exc.strerror}") from None
