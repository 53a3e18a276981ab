"""Linux namespaces: the OCI type names, joining by path, creating new ones, and user-namespace id maps."""

from __future__ import annotations

import os

from clave.linux import sys as lsys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLONE_FLAGS: dict[str, int] = {
    "user": lsys.CLONE_NEWUSER,
    "mount": lsys.CLONE_NEWNS,
    "uts": lsys.CLONE_NEWUTS,
    "ipc": lsys.CLONE_NEWIPC,
    "network": lsys.CLONE_NEWNET,
    "pid": lsys.CLONE_NEWPID,
    "cgroup": lsys.CLONE_NEWCGROUP,
    "time": lsys.CLONE_NEWTIME,
}
# /proc/<pid>/ns/<name> for each OCI type.
PROC_NAMES: dict[str, str] = {
    "user": "user", "mount": "mnt", "uts": "uts", "ipc": "ipc", "network": "net", "pid": "pid",
    "cgroup": "cgroup", "time": "time",
}
# Join order matters: the user namespace first (it grants the rights to join the others), mount last.
JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "time", "mount")


class NamespaceError(Exception):
    """Joining or creating a namespace failed; one line."""


def open_paths(wanted: dict[str, str | None]) -> list[tuple[str, int]]:
    """Open the namespaces to join (in the runtime, where their paths resolve) -> [(type, fd)]."""
    opened = []
    for ns_type in JOIN_ORDER:
        path = wanted.get(ns_type)
        if path:
            try:
                opened.append((ns_type, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
            except OSError as exc:
                for _, fd in opened:
                    os.close(fd)
                raise NamespaceError(f"{ns_type} namespace {path}: {exc.strerror}") from None
    return opened


def join(opened: list[tuple[str, int]]) -> None:
    for ns_type, fd in opened:
        try:
            lsys.setns(fd, CLONE_FLAGS[ns_type])
        except OSError as exc:
            raise NamespaceError(f"join {ns_type} namespace: {os.strerror(exc.errno or 0)}") from None
        finally:
            os.close(fd)


def new_flags(wanted: dict[str, str | None], exclude: tuple[str, ...] = ()) -> int:
    flags = 0
    for ns_type, path in wanted.items():
        if path is None and ns_type not in exclude:
            flags |= CLONE_FLAGS[ns_type]
    return flags


def write_id_maps(pid: int, uid_maps: list[dict[str, Any]], gid_maps: list[dict[str, Any]]) -> None:
    """Write /proc/<pid>/{uid,gid}_map from the runtime (root in the parent user namespace)."""

    def render(maps: list[dict[str, Any]]) -> bytes:
        return "".join(f"{m['containerID']} {m['hostID']} {m['size']}\n" for m in maps).encode()

    try:
        if gid_maps:
            with open(f"/proc/{pid}/gid_map", "wb") as f:
                f.write(render(gid_maps))
        if uid_maps:
            with open(f"/proc/{pid}/uid_map", "wb") as f:
                f.write(render(uid_maps))
    except OSError as exc:
        raise NamespaceError(f"write user namespace id mappings: {exc.strerror}") from None


def id_maps_of(path: str) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """The uid and gid mappings of the user namespace at ``path`` (to join it: its root's host ids)."""
    if path.startswith("/proc/") and path.endswith("/ns/user"):
        base = path[: -len("ns/user")]
        try:
            with open(base + "uid_map") as u, open(base + "gid_map") as g:
                return _parse_map(u.read()), _parse_map(g.read())
        except OSError as exc:
            raise NamespaceError(f"user namespace {path}: {exc.strerror}") from None
    # Any other namespace file: a child joins it and reads its own maps.
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            lsys.setns(fd, lsys.CLONE_NEWUSER)
            with open("/proc/self/uid_map") as u, open("/proc/self/gid_map") as g:
                os.write(write_end, f"{u.read()}\0{g.read()}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read().decode()
    os.waitpid(child, 0)
    if "\0" not in data:
        raise NamespaceError(f"user namespace {path}: cannot read its id mappings")
    uid_text, gid_text = data.split("\0")
    return _parse_map(uid_text), _parse_map(gid_text)


def _parse_map(text: str) -> list[dict[str, int]]:
    maps = []
    for line in text.splitlines():
        container_id, host_id, size = (int(x) for x in line.split())
        maps.append({"containerID": container_id, "hostID": host_id, "size": size})
    return maps


def same_as_host(ns_type: str, path: str) -> bool:
    """Does ``path`` name the namespace this process is already in?"""
    try:
        a = os.stat(path)
        b = os.stat(f"/proc/self/ns/{PROC_NAMES[ns_type]}")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
