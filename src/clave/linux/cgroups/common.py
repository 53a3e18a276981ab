"""Shared pieces of the cgroup backends: the error, the abstract manager, file helpers, mount discovery
and the translation of an OCI ``linux.cgroupsPath`` into a path inside a hierarchy.

Every helper works on plain ``os`` calls (no subprocess, no pathlib) because container start latency is
measured against runc.
"""

from __future__ import annotations

import errno
import os
import time
from abc import ABC, abstractmethod

TYPE_CHECKING = False  # typing is not imported at run time: start-up latency matters
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
SIGKILL = 9  # the same on every Linux ABI; avoids importing signal (and enum) on the start path
UNIFIED_KEY = "unified"  # paths() key of a cgroup2 directory (the only key on v2, an extra one on hybrid)


class CgroupError(Exception):
    """A cgroup operation failed or a requested resource cannot be applied on this host (one line)."""


# --- file helpers -------------------------------------------------------------------------------------


def read_text(path: str, what: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        chunks = []
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode()
    except OSError as exc:
        raise CgroupError(f"{what}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_optional(path: str) -> str | None:
    """The file's text, or None when the host lacks it (stats omit what is not there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 20).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


def write_text(path: str, value: str, what: str) -> None:
    """Write one value to a cgroup file; ``what`` names the OCI resource for the error message."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise CgroupError(f"{what}: not supported by this host ({path} does not exist)") from None
        raise CgroupError(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"{what}: writing {value!r} to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, memory.events, ...) as integers."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def parse_int(text: str | None, *, max_as: int = 0) -> int:
    """An integer file; the word ``max`` (unlimited) becomes ``max_as``."""
    if text is None:
        return 0
    text = text.strip()
    if text == "max" or not text:
        return max_as
    return int(text)


# --- discovery ----------------------------------------------------------------------------------------


def detect_mode() -> str:
    """"v2" when /sys/fs/cgroup is cgroup2, "hybrid" when v1 with cgroup2 at .../unified, else "v1"."""
    if os.path.exists(CGROUP_ROOT + "/cgroup.controllers"):
        return "v2"
    if os.path.exists(CGROUP_ROOT + "/unified/cgroup.controllers"):
        return "hybrid"
    return "v1"


class Mount:
    """One cgroup hierarchy mount: where it is and which cgroup its root shows."""

    __slots__ = ("mountpoint", "root", "controllers")

    def __init__(self, mountpoint: str, root: str, controllers: tuple[str, ...]) -> None:
        self.mountpoint = mountpoint
        self.root = root
        self.controllers = controllers


_mounts_cache: tuple[dict[str, Mount], Mount | None] | None = None


def cgroup_mounts() -> tuple[dict[str, Mount], Mount | None]:
    """v1 hierarchies keyed by controller (and ``name=...`` for named ones) plus the cgroup2 mount.

    Parsed once per process: mounts under /sys/fs/cgroup do not change while a runtime runs. The first
    mount of a hierarchy wins (bind mounts of the same hierarchy come later in mountinfo).
    """
    global _mounts_cache
    if _mounts_cache is not None:
        return _mounts_cache
    v1: dict[str, Mount] = {}
    unified: Mount | None = None
    from clave.linux import mountinfo

    for entry in mountinfo.entries():
        if entry.fstype == "cgroup2":
            if unified is None:
                unified = Mount(entry.point, entry.root, ())
            continue
        if entry.fstype != "cgroup":
            continue
        controllers = tuple(
            opt for opt in entry.super_options.split(",")
            if opt not in ("rw", "ro") and ("=" not in opt or opt.startswith("name="))
        )
        mount = Mount(entry.point, entry.root, controllers)
        for controller in controllers:
            v1.setdefault(controller, mount)
    _mounts_cache = (v1, unified)
    return _mounts_cache


def own_cgroups() -> dict[str, str]:
    """This process's cgroup per controller ("" for cgroup2, "name=systemd" for named), from /proc/self/cgroup."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                out[name] = path
    return out


def own_cgroup(controller: str, table: dict[str, str] | None = None) -> str:
    path = (table if table is not None else own_cgroups()).get(controller)
    if path is None:
        raise CgroupError(f"cgroup: this process is in no {controller or 'cgroup2'} hierarchy")
    return path


def path_in_mount(mount: Mount, cgroup_path: str) -> str:
    """The directory of an absolute cgroup path (as seen in /proc/PID/cgroup) under a mount."""
    if mount.root != "/" and (cgroup_path == mount.root or cgroup_path.startswith(mount.root + "/")):
        cgroup_path = cgroup_path[len(mount.root):]
    return os.path.normpath(mount.mountpoint + "/" + cgroup_path.lstrip("/"))


def start_migration_grace_period() -> int:
    """Fork a child that rewrites its own pid into its own cgroup's ``cgroup.procs``; returns its pid (0 when
    it could not be started). Reap it with ``os.waitpid`` once done.

    Why: the first move of a process into a cgroup after a quiet spell makes the kernel wait for an RCU grace
    period (``cgroup.procs`` writes take the threadgroup lock, whose fast path is only switched off after one),
    10-16 ms on this project's machines, and holds ``cgroup_mutex`` meanwhile. The move itself is a no-op here;
    what matters is that the grace period runs while the runtime imports and reads its config instead of after
    it has forked the container's init. Later moves within about one grace period of it skip the wait.
    """
    try:
        v1, unified = cgroup_mounts()
        mine = own_cgroups()
        if unified is not None and "" in mine:
            directory = path_in_mount(unified, mine[""])
        else:
            directory = next(path_in_mount(m, mine[c]) for c, m in v1.items() if c in mine)
        fd = os.open(directory + "/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    except (OSError, CgroupError, StopIteration, ValueError):
        return 0  # not root, no cgroup mounts: nothing to prepare
    try:
        pid = os.fork()
    except OSError:
        os.close(fd)
        return 0
    if pid == 0:
        try:
            os.write(fd, b"0")  # 0: the writer itself
        finally:
            os._exit(0)
    os.close(fd)
    return pid


# --- cgroupsPath --------------------------------------------------------------------------------------


def _clean(path: str) -> str:
    """Normalise like runc's CleanPath: ``..`` cannot climb above the start; relative stays relative."""
    absolute = path.startswith("/")
    cleaned = os.path.normpath("/" + path.lstrip("/"))  # "//x" would survive normpath
    return cleaned if absolute else cleaned.lstrip("/")


def looks_like_systemd(cgroups_path: str) -> bool:
    parts = cgroups_path.split(":")
    return len(parts) == 3 and "/" not in cgroups_path and (parts[0] == "" or parts[0].endswith(".slice"))


def expand_slice(slice_name: str) -> str:
    """``a-b.slice`` -> ``/a.slice/a-b.slice`` (systemd's slice nesting); ``-.slice`` is the root."""
    suffix = ".slice"
    if not slice_name.endswith(suffix) or "/" in slice_name:
        raise CgroupError(f"cgroupsPath: invalid systemd slice {slice_name!r}")
    if slice_name == "-.slice":
        return "/"
    stem = slice_name[: -len(suffix)]
    if not stem or "--" in stem or stem.startswith("-") or stem.endswith("-"):
        raise CgroupError(f"cgroupsPath: invalid systemd slice {slice_name!r}")
    out = ""
    prefix = ""
    for component in stem.split("-"):
        prefix = prefix + "-" + component if prefix else component
        out += "/" + prefix + suffix
    return out


def systemd_to_path(cgroups_path: str) -> str:
    """``slice:prefix:name`` (runc --systemd-cgroup) -> ``/<expanded slice>/<prefix>-<name>.scope``."""
    slice_name, prefix, name = cgroups_path.split(":")
    if not name:
        raise CgroupError(f"cgroupsPath: {cgroups_path!r} has no unit name")
    parent = expand_slice(slice_name or "system.slice")
    if name.endswith(".slice"):
        unit = name  # an explicit slice is used as is, like runc
    else:
        unit = (prefix + "-" + name if prefix else name) + ".scope"
    return parent.rstrip("/") + "/" + unit


def normalise_cgroups_path(cgroups_path: str | None, container_id: str, systemd: bool | None = None) -> str:
    """The cgroup path to use, absolute or relative (a relative one is resolved by each backend).

    Follows runc's cgroupfs driver: an empty path means ``<id>`` relative to the caller's own cgroup; a
    relative path is relative to the caller's own cgroup (v1) or its parent (v2). The systemd form
    ``slice:prefix:name`` maps to an absolute path (``system.slice`` by default), no systemd needed.
    """
    if not cgroups_path:
        if not container_id or "/" in container_id:
            raise CgroupError(f"cgroupsPath: invalid container id {container_id!r}")
        return container_id
    if systemd or (systemd is None and looks_like_systemd(cgroups_path)):
        return systemd_to_path(cgroups_path)
    return _clean(cgroups_path)


# --- the manager interface ----------------------------------------------------------------------------


class CgroupManager(ABC):
    """One container's cgroup(s). Create, configure, join, observe and remove them."""

    @abstractmethod
    def create(self) -> None: ...

    @abstractmethod
    def add_process(self, pid: int) -> None: ...

    @abstractmethod
    def set(self, resources: dict[str, Any], warn: Callable[[str], None] | None = None) -> None:
        """Apply ``resources``; deprecated fields this host cannot apply are dropped, named through ``warn``."""

    @abstractmethod
    def freeze(self) -> None: ...

    @abstractmethod
    def thaw(self) -> None: ...

    @abstractmethod
    def frozen(self) -> bool: ...

    @abstractmethod
    def pids(self) -> list[int]: ...

    @abstractmethod
    def kill_all(self, sig: int) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def oom_kill_count(self) -> int: ...

    @abstractmethod
    def paths(self) -> dict[str, str]: ...

    @abstractmethod
    def destroy(self) -> None: ...

    @classmethod
    def from_paths(cls, paths: dict[str, str]) -> CgroupManager:
        """Rebuild a manager from ``paths()`` saved in a state file (importing only that backend)."""
        if set(paths) == {UNIFIED_KEY}:
            from clave.linux.cgroups.v2 import V2Manager

            return V2Manager(paths[UNIFIED_KEY])
        from clave.linux.cgroups.v1 import V1Manager

        return V1Manager(dict(paths))


# --- shared helpers for the backends -------------------------------------------------------------------


def make_dirs(path: str, what: str) -> list[str]:
    """mkdir -p; returns the directories it created, outermost first."""
    missing: list[str] = []
    probe = path
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    missing.reverse()
    for directory in missing:
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"{what}: cannot create {directory}: {exc.strerror}") from None
    return missing


def remove_tree(path: str) -> None:
    """rmdir a cgroup and any cgroups below it, deepest first; retries briefly on EBUSY (exiting tasks).

    The common case (no sub-cgroups) costs one rmdir; the directory is only listed when rmdir says busy.
    """
    delay = 0.002
    deadline = time.monotonic() + 0.5
    children_removed = False
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or (children_removed and time.monotonic() >= deadline):
                raise CgroupError(f"cgroup: cannot remove {path}: {exc.strerror}") from None
        if not children_removed:
            for entry in os.scandir(path):
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(entry.path)
            children_removed = True
            continue
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def procs_recursive(path: str) -> list[int]:
    """Every pid in cgroup.procs of ``path`` and its descendants."""
    out: list[int] = []
    text = read_optional(path + "/cgroup.procs")
    if text is None:
        if not os.path.isdir(path):
            return out
        raise CgroupError(f"cgroup: cannot read {path}/cgroup.procs")
    out.extend(int(p) for p in text.split())
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            out.extend(procs_recursive(entry.path))
    return out


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def hugepage_sizes() -> list[str]:
    """Huge page sizes as cgroup file names use them ("2MB", "1GB"), from /sys/kernel/mm/hugepages."""
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return []
    sizes = []
    for name in names:  # hugepages-2048kB
        kib = int(name.removeprefix("hugepages-").removesuffix("kB"))
        sizes.append(page_size_name(kib * 1024))
    return sorted(sizes)


def page_size_name(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def device_rule_lines(devices: list[dict[str, Any]]) -> list[tuple[bool, str]]:
    """OCI device rules as (allow, "type major:minor access") in order, for v1 devices.allow/deny."""
    out = []
    for rule in devices:
        dev_type = rule.get("type") or "a"
        if dev_type not in ("a", "b", "c"):
            raise CgroupError(f"devices: invalid device type {dev_type!r}")
        major = rule.get("major")
        minor = rule.get("minor")
        access = rule.get("access") or "rwm"
        if set(access) - set("rwm"):
            raise CgroupError(f"devices: invalid access {access!r}")
        major_s = "*" if major is None or major == -1 else str(int(major))
        minor_s = "*" if minor is None or minor == -1 else str(int(minor))
        out.append((bool(rule.get("allow")), f"{dev_type} {major_s}:{minor_s} {access}"))
    return out


def present(value: Any) -> bool:
    """An OCI field counts as set when it is not None (false/0 are real values for most fields)."""
    return value is not None


def drop_kernel_memory(
    resources: dict[str, Any], usable: Callable[[str], bool], warn: Callable[[str], None] | None
) -> dict[str, Any]:
    """``resources`` without memory.kernel / memory.kernelTCP where ``usable(key)`` says they are not applied.

    Both are deprecated in the runtime spec and meaningless on recent kernels (5.16+ ignores kmem limits, none
    exist in v2); runc 1.1 and crun warn or stay silent and go on, so a container is not refused for them.
    """
    memory = resources.get("memory")
    if not memory:
        return resources
    dropped = [key for key in ("kernel", "kernelTCP") if present(memory.get(key)) and not usable(key)]
    if not dropped:
        return resources
    for key in dropped:
        if warn is not None:
            warn(f"memory.{key}: kernel memory limits are deprecated and not applied; ignored")
    return {**resources, "memory": {k: v for k, v in memory.items() if k not in dropped}}


def weight_set(value: Any) -> bool:
    """Block-IO weights count as set when not None and not 0: 0 is outside every weight range and runc reads
    it as unset (Docker writes ``blockIO.weight: 0`` into every config)."""
    return value is not None and value != 0
