"""Linux control groups for native containers: one interface over cgroup v1, hybrid and v2 hosts.

    manager = cgroup_manager(config["linux"].get("cgroupsPath"), container_id)
    manager.create(); manager.set(resources); manager.add_process(pid)
    ...
    CgroupManager.from_paths(manager.paths())   # later, from the state file

cgroupsPath follows runc: empty means ``<id>``; a relative path is relative to the caller's own cgroup
(v1; on v2 the parent of it); an absolute path hangs off the hierarchy root; ``slice:prefix:name`` (systemd
form) maps to ``/<expanded slice>/<prefix>-<name>.scope``. On hybrid hosts the container also gets a
directory in the cgroup2 hierarchy, so ``cgroup.kill`` and cgroup2 BPF programs reach it. On v1 the
``name=systemd`` hierarchy is created and joined too (as runc does) but carries no resources.

Resources follow the OCI ``linux.resources`` object (camelCase, as in config.json). A value left out or None
is not written; a resource this host cannot apply (missing controller or file, a v1-only knob on v2, a
kernel that ignores the write) raises CgroupError naming it, checked before anything is written where
possible. Devices: v1 writes devices.allow/deny in order; v2 attaches a BPF_PROG_TYPE_CGROUP_DEVICE program
(last matching rule wins, no match denies); an empty rule list changes nothing on either.
"""

from __future__ import annotations

from clave.linux.cgroups.common import (
    UNIFIED_KEY,
    CgroupError,
    CgroupManager,
    detect_mode,
    normalise_cgroups_path,
    start_migration_grace_period,
)


def cgroup_manager(cgroups_path: str | None, container_id: str, *, systemd: bool | None = None) -> CgroupManager:
    """The manager for a container's cgroup on this host (nothing is created until ``create()``).

    ``systemd`` forces (True) or forbids (False) reading ``cgroups_path`` as ``slice:prefix:name``;
    None recognises that form by its shape.
    """
    path = normalise_cgroups_path(cgroups_path, container_id, systemd)
    mode = detect_mode()
    if mode == "v2":
        from clave.linux.cgroups.v2 import V2Manager

        return V2Manager.for_path(path)
    from clave.linux.cgroups.v1 import V1Manager

    return V1Manager.for_path(path, hybrid=mode == "hybrid")


__all__ = [
    "UNIFIED_KEY",
    "CgroupError",
    "CgroupManager",
    "cgroup_manager",
    "detect_mode",
    "start_migration_grace_period",
]
