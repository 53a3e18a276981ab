"""cgroup v2 (unified hierarchy) backend."""

from __future__ import annotations

import os
import time

from clave.linux.cgroups.common import (
    SIGKILL,
    UNIFIED_KEY,
    CgroupError,
    CgroupManager,
    cgroup_mounts,
    drop_kernel_memory,
    make_dirs,
    own_cgroup,
    parse_flat_keyed,
    path_in_mount,
    present,
    procs_recursive,
    read_optional,
    read_text,
    remove_tree,
    signal_pids,
    weight_set,
    write_text,
)
from clave.linux.cgroups.v1 import rdma_line

TYPE_CHECKING = False  # typing is not imported at run time: start-up latency matters
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_RESOURCE_KEYS = {
    "memory", "cpu", "pids", "blockIO", "hugepageLimits", "devices", "network", "rdma", "unified",
}


_Names = set[str]  # spelled once here: inside the class, ``set`` is the method


class V2Manager(CgroupManager):
    """One directory in the unified hierarchy. ``mount`` is the cgroup2 mount point above it."""

    def __init__(self, path: str, mount: str | None = None) -> None:
        self._path = path
        self._mount = mount or _mount_of(path)

    @classmethod
    def for_path(cls, cgroup_path: str) -> V2Manager:
        """Absolute paths hang off the mount; relative ones off the parent of our own cgroup (as runc)."""
        _, unified = cgroup_mounts()
        if unified is None:
            raise CgroupError("cgroup: no cgroup2 hierarchy is mounted")
        if cgroup_path.startswith("/"):
            path = unified.mountpoint + cgroup_path
        else:
            # our own cgroup has tasks, so controllers cannot be enabled below it: use its parent
            base = os.path.dirname(path_in_mount(unified, own_cgroup("")))
            if not base.startswith(unified.mountpoint):
                base = unified.mountpoint
            path = base + "/" + cgroup_path
        return cls(os.path.normpath(path), unified.mountpoint)

    def paths(self) -> dict[str, str]:
        return {UNIFIED_KEY: self._path}

    # --- lifecycle --------------------------------------------------------------------------------

    def create(self) -> None:
        make_dirs(self._path, "cgroup")
        self._enable_controllers()

    def _enable_controllers(self) -> None:
        """Enable every available controller in each ancestor's subtree_control, root first (as runc)."""
        relative = os.path.relpath(self._path, self._mount)
        if relative == ".":
            return
        directory = self._mount
        for component in relative.split("/"):
            available = read_text(directory + "/cgroup.controllers", "cgroup").split()
            enabled = set(read_text(directory + "/cgroup.subtree_control", "cgroup").split())
            wanted = [c for c in available if c not in enabled]
            if wanted:
                try:
                    write_text(directory + "/cgroup.subtree_control", " ".join("+" + c for c in wanted), "cgroup")
                except CgroupError:
                    # one controller may be refused (e.g. cpu with realtime tasks): enable the rest one by one
                    for controller in wanted:
                        try:
                            write_text(directory + "/cgroup.subtree_control", "+" + controller, "cgroup")
                        except CgroupError:
                            pass
            directory = directory + "/" + component

    def add_process(self, pid: int) -> None:
        write_text(self._path + "/cgroup.procs", str(pid), f"cgroup: adding pid {pid}")

    def destroy(self) -> None:
        remove_tree(self._path)

    # --- resources ---------------------------------------------------------------------------------

    def _controllers(self) -> _Names:
        text = read_optional(self._path + "/cgroup.controllers")
        if text is None:
            raise CgroupError(f"cgroup: {self._path} does not exist (create it first)")
        return set(text.split())

    def _need(self, controllers: _Names, controller: str, what: str) -> None:
        if controller not in controllers:
            raise CgroupError(f"{what}: the {controller} controller is not available in {self._path}")

    def set(self, resources: dict[str, Any], warn: Callable[[str], None] | None = None) -> None:
        unknown = set(resources) - _RESOURCE_KEYS
        if unknown:
            raise CgroupError(f"resources: unknown resource {sorted(unknown)[0]!r}")
        resources = drop_kernel_memory(resources, lambda key: False, warn)  # no kmem in cgroup v2
        controllers = self._controllers()
        self._check_supported(resources, controllers)
        path = self._path
        if resources.get("memory"):
            self._set_memory(resources["memory"])
        if resources.get("cpu"):
            self._set_cpu(resources["cpu"])
        pids = resources.get("pids")
        if pids and present(pids.get("limit")) and pids["limit"] != 0:
            limit = int(pids["limit"])
            write_text(path + "/pids.max", str(limit) if limit > 0 else "max", "pids.limit")
        if resources.get("blockIO"):
            self._set_io(resources["blockIO"])
        for entry in resources.get("hugepageLimits") or []:
            size = entry["pageSize"]
            write_text(f"{path}/hugetlb.{size}.max", str(int(entry["limit"])), f"hugepageLimits[{size}]")
        for device, limits in (resources.get("rdma") or {}).items():
            write_text(path + "/rdma.max", rdma_line(device, limits), f"rdma[{device}]")
        for key, value in (resources.get("unified") or {}).items():
            write_text(f"{path}/{key}", str(value), f"unified[{key}]")
        if resources.get("devices"):  # an empty list changes nothing, as on v1
            from clave.linux.cgroups.devices_bpf import apply_device_rules

            apply_device_rules(path, resources["devices"])

    def _check_supported(self, resources: dict[str, Any], controllers: _Names) -> None:
        """Refuse what cgroup v2 or this host cannot do before writing anything."""
        memory = resources.get("memory") or {}
        if memory:
            if present(memory.get("swappiness")):
                raise CgroupError("memory.swappiness: not supported by cgroup v2")
            if memory.get("disableOOMKiller"):
                raise CgroupError("memory.disableOOMKiller: not supported by cgroup v2")
            if memory.get("useHierarchy") is False:
                raise CgroupError("memory.useHierarchy: cgroup v2 is always hierarchical")
            if any(present(memory.get(k)) for k in ("limit", "reservation", "swap")):
                self._need(controllers, "memory", "memory")
            if present(memory.get("swap")) and memory["swap"] != 0 and not os.path.exists(
                self._path + "/memory.swap.max"
            ):
                raise CgroupError("memory.swap: swap accounting is not enabled on this host")
        cpu = resources.get("cpu") or {}
        if cpu:
            for key in ("realtimeRuntime", "realtimePeriod"):
                if cpu.get(key):
                    raise CgroupError(f"cpu.{key}: realtime scheduling limits do not exist in cgroup v2")
            for key in ("shares", "quota", "period", "burst"):
                if cpu.get(key):
                    self._need(controllers, "cpu", f"cpu.{key}")
            if present(cpu.get("idle")) and not os.path.exists(self._path + "/cpu.idle"):
                raise CgroupError("cpu.idle: not supported by this kernel (no cpu.idle)")
            for key in ("cpus", "mems"):
                if cpu.get(key):
                    self._need(controllers, "cpuset", f"cpu.{key}")
        pids = resources.get("pids") or {}
        if present(pids.get("limit")) and pids["limit"] != 0:
            self._need(controllers, "pids", "pids.limit")
        blkio = resources.get("blockIO") or {}
        if blkio:
            if weight_set(blkio.get("leafWeight")) or any(
                weight_set(e.get("leafWeight")) for e in blkio.get("weightDevice") or []
            ):
                raise CgroupError("blockIO.leafWeight: not supported by cgroup v2")
            if any(blkio.get(k) for k in ("weight", "weightDevice", "throttleReadBpsDevice",
                                          "throttleWriteBpsDevice", "throttleReadIOPSDevice",
                                          "throttleWriteIOPSDevice")):
                self._need(controllers, "io", "blockIO")
            weights = weight_set(blkio.get("weight")) or any(
                weight_set(e.get("weight")) for e in blkio.get("weightDevice") or []
            )
            if weights and self._io_weight_file() is None:
                raise CgroupError("blockIO.weight: not supported by this kernel (no io.bfq.weight or io.weight)")
        if resources.get("hugepageLimits"):
            self._need(controllers, "hugetlb", "hugepageLimits")
        network = resources.get("network") or {}
        if present(network.get("classID")):
            raise CgroupError("network.classID: net_cls does not exist in cgroup v2")
        if network.get("priorities"):
            raise CgroupError("network.priorities: net_prio does not exist in cgroup v2")
        if resources.get("rdma"):
            self._need(controllers, "rdma", "rdma")
        for key in resources.get("unified") or {}:
            if "/" in key or key.startswith(".") or not key:
                raise CgroupError(f"unified[{key}]: not a cgroup file name")
            if not os.path.exists(f"{self._path}/{key}"):
                controller = key.partition(".")[0]
                reason = (f"the {controller} controller is not enabled" if controller not in controllers
                          and controller != "cgroup" else f"no such file in {self._path}")
                raise CgroupError(f"unified[{key}]: {reason}")

    def _set_memory(self, memory: dict[str, Any]) -> None:
        path = self._path
        limit: Any = memory.get("limit")
        swap: Any = memory.get("swap")
        if memory.get("checkBeforeUpdate") and present(limit) and limit > 0:
            usage = int(read_text(path + "/memory.current", "memory").strip())
            if usage >= limit:
                raise CgroupError(f"memory.limit: current usage {usage} is not below the new limit {limit}")
        swap_v2 = _swap_v2(swap, limit)
        if swap_v2 == -1 and swap is None and not os.path.exists(path + "/memory.swap.max"):
            swap_v2 = None  # implied "unlimited swap" on a host without swap accounting: nothing to lift
        if swap_v2 is not None:
            # memory.swap.max is independent of memory.max in v2: order does not matter
            write_text(path + "/memory.swap.max", "max" if swap_v2 == -1 else str(swap_v2), "memory.swap")
        if present(limit) and limit != 0:
            write_text(path + "/memory.max", "max" if limit == -1 else str(int(limit)), "memory.limit")
        reservation: Any = memory.get("reservation")
        if present(reservation) and reservation != 0:
            write_text(path + "/memory.low", "max" if reservation == -1 else str(int(reservation)),
                       "memory.reservation")

    def _set_cpu(self, cpu: dict[str, Any]) -> None:
        path = self._path
        shares = cpu.get("shares")
        if shares:
            # runc's mapping of v1 shares [2, 262144] onto v2 weight [1, 10000]
            weight = 1 + ((int(shares) - 2) * 9999) // 262142
            write_text(path + "/cpu.weight", str(weight), "cpu.shares")
        quota: Any = cpu.get("quota")
        period: Any = cpu.get("period")
        if quota or period:
            current = read_text(path + "/cpu.max", "cpu.quota").split()
            quota_s = current[0] if not quota else ("max" if quota < 0 else str(int(quota)))
            period_s = str(int(period)) if period else current[1]
            write_text(path + "/cpu.max", f"{quota_s} {period_s}", "cpu.quota")
        if present(cpu.get("burst")):
            write_text(path + "/cpu.max.burst", str(int(cpu["burst"])), "cpu.burst")
        if present(cpu.get("idle")):
            write_text(path + "/cpu.idle", str(int(cpu["idle"])), "cpu.idle")
        for key in ("cpus", "mems"):
            if cpu.get(key):
                write_text(f"{path}/cpuset.{key}", str(cpu[key]), f"cpu.{key}")

    def _io_weight_file(self) -> str | None:
        for name in ("io.bfq.weight", "io.weight"):
            if os.path.exists(f"{self._path}/{name}"):
                return name
        return None

    def _set_io(self, blkio: dict[str, Any]) -> None:
        path = self._path
        weight_file = self._io_weight_file()

        def converted(weight: int) -> int:
            # io.weight is 1..10000; blkio weights are 10..1000 (runc's conversion). BFQ takes them as is.
            return weight if weight_file == "io.bfq.weight" else 1 + (weight - 10) * 9999 // 990

        if weight_set(blkio.get("weight")):
            write_text(f"{path}/{weight_file}", str(converted(int(blkio["weight"]))), "blockIO.weight")
        for entry in blkio.get("weightDevice") or []:
            if weight_set(entry.get("weight")):
                line = f"{int(entry['major'])}:{int(entry['minor'])} {converted(int(entry['weight']))}"
                write_text(f"{path}/{weight_file}", line, "blockIO.weightDevice")
        for key, name in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                          ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):
            for entry in blkio.get(key) or []:
                rate = int(entry["rate"])
                line = f"{int(entry['major'])}:{int(entry['minor'])} {name}={rate if rate > 0 else 'max'}"
                write_text(path + "/io.max", line, f"blockIO.{key}")

    # --- freezer, processes ------------------------------------------------------------------------

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        what = "freeze" if frozen else "thaw"
        write_text(self._path + "/cgroup.freeze", "1" if frozen else "0", what)
        deadline = time.monotonic() + 5.0
        delay = 0.0001
        while self.frozen() != frozen:
            if time.monotonic() >= deadline:
                raise CgroupError(f"{what}: {self._path}/cgroup.events did not report frozen {int(frozen)} in 5 s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def frozen(self) -> bool:
        from clave.linux import freezer

        return freezer.frozen({UNIFIED_KEY: self._path})

    def pids(self) -> list[int]:
        return procs_recursive(self._path)

    def kill_all(self, sig: int) -> None:
        if sig == SIGKILL and os.path.exists(self._path + "/cgroup.kill"):
            write_text(self._path + "/cgroup.kill", "1", "kill")
            return
        if not os.path.exists(self._path + "/cgroup.freeze"):  # kernels before 5.2
            signal_pids(self.pids(), sig)
            return
        self.freeze()
        try:
            signal_pids(self.pids(), sig)
        finally:
            self.thaw()

    # --- observation -------------------------------------------------------------------------------

    def oom_kill_count(self) -> int:
        text = read_optional(self._path + "/memory.events")
        return parse_flat_keyed(text).get("oom_kill", 0) if text else 0

    def stats(self) -> dict[str, Any]:
        from clave.linux.cgroups import stats as statsmod  # only `events --stats` needs it

        path = self._path
        out: dict[str, Any] = {"cpu": statsmod.cpu_v2(path)}
        memory = statsmod.memory_v2(path)
        if memory is not None:
            out["memory"] = memory
        pids = statsmod.pids(path)
        if pids is not None:
            out["pids"] = pids
        blkio = statsmod.blkio_v2(path)
        if blkio is not None:
            out["blkio"] = blkio
        hugetlb = statsmod.hugetlb(path, v2=True)
        if hugetlb:
            out["hugetlb"] = hugetlb
        cpuset = statsmod.cpuset(path)
        if cpuset:
            out["cpuset"] = cpuset
        return out


def _swap_v2(swap: int | None, limit: int | None) -> int | None:
    """OCI swap (memory+swap, v1 style) -> memory.swap.max; None leaves it alone (runc's rules)."""
    if limit == -1 and not swap:
        return -1  # unlimited memory with swap unset: lift swap too
    if swap is None or swap == 0:
        return None
    if swap == -1:
        return -1
    if not limit or limit < 0:
        raise CgroupError("memory.swap: a swap limit needs a memory limit")
    if swap < limit:
        raise CgroupError(f"memory.swap: {swap} is below memory.limit {limit} (swap counts memory plus swap)")
    return swap - limit


def _mount_of(path: str) -> str:
    _, unified = cgroup_mounts()
    if unified is not None and (path == unified.mountpoint or path.startswith(unified.mountpoint + "/")):
        return unified.mountpoint
    raise CgroupError(f"cgroup: {path} is not inside the cgroup2 mount")

