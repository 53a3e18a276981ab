"""cgroup v1 backend, with the hybrid variant (v1 controllers plus a cgroup2 directory for cgroup.kill)."""

from __future__ import annotations

import os
import time

from clave.linux.cgroups.common import (
    SIGKILL,
    UNIFIED_KEY,
    CgroupError,
    CgroupManager,
    cgroup_mounts,
    device_rule_lines,
    drop_kernel_memory,
    make_dirs,
    own_cgroup,
    own_cgroups,
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

TYPE_CHECKING = False  # typing is not imported at run time: start-up latency matters
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# v1 controllers Clave manages (created and joined); other named hierarchies are left alone.
KNOWN_CONTROLLERS = (
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "hugetlb",
    "net_cls", "net_prio", "perf_event", "rdma", "misc", "name=systemd",
)
_RESOURCE_KEYS = {
    "memory", "cpu", "pids", "blockIO", "hugepageLimits", "devices", "network", "rdma", "unified",
}


class V1Manager(CgroupManager):
    """One directory per mounted v1 hierarchy (co-mounted controllers share one), plus ``unified`` on hybrid."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths

    @classmethod
    def for_path(cls, cgroup_path: str, hybrid: bool) -> V1Manager:
        """Directories for ``cgroup_path`` (absolute, or relative to this process's own cgroup, as runc)."""
        v1_mounts, unified = cgroup_mounts()
        paths: dict[str, str] = {}
        own = None if cgroup_path.startswith("/") else own_cgroups()
        for controller, mount in v1_mounts.items():
            if controller not in KNOWN_CONTROLLERS:
                continue
            if cgroup_path.startswith("/"):
                paths[controller] = os.path.normpath(mount.mountpoint + cgroup_path)
            else:
                base = path_in_mount(mount, own_cgroup(controller, own))
                paths[controller] = os.path.normpath(base + "/" + cgroup_path)
        if not paths:
            raise CgroupError("cgroup: no cgroup v1 hierarchy is mounted")
        if hybrid and unified is not None:
            if cgroup_path.startswith("/"):
                paths[UNIFIED_KEY] = os.path.normpath(unified.mountpoint + cgroup_path)
            else:
                base = path_in_mount(unified, own_cgroup("", own))
                paths[UNIFIED_KEY] = os.path.normpath(base + "/" + cgroup_path)
        return cls(paths)

    # --- lifecycle --------------------------------------------------------------------------------

    def paths(self) -> dict[str, str]:
        return dict(self._paths)

    def _dirs(self) -> list[str]:
        return list(dict.fromkeys(self._paths.values()))  # co-mounted controllers share a directory

    def _dir(self, controller: str, what: str) -> str:
        path = self._paths.get(controller)
        if path is None:
            raise CgroupError(f"{what}: the {controller} cgroup controller is not mounted on this host")
        return path

    def create(self) -> None:
        for directory in self._dirs():
            created = make_dirs(directory, "cgroup")
            if directory == self._paths.get("cpuset"):
                self._fill_cpuset(created)

    def _fill_cpuset(self, created: list[str]) -> None:
        # A new v1 cpuset has empty cpus/mems and refuses tasks: copy each parent's, outermost first.
        leaf = self._paths["cpuset"]
        for directory in created or [leaf]:
            parent = os.path.dirname(directory)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if read_text(f"{directory}/{name}", "cpuset").strip():
                    continue
                value = read_text(f"{parent}/{name}", "cpuset").strip()
                write_text(f"{directory}/{name}", value, "cpuset")

    def add_process(self, pid: int) -> None:
        for directory in self._dirs():
            write_text(directory + "/cgroup.procs", str(pid), f"cgroup: adding pid {pid}")

    def destroy(self) -> None:
        for directory in self._dirs():
            remove_tree(directory)

    # --- resources ---------------------------------------------------------------------------------

    def set(self, resources: dict[str, Any], warn: Callable[[str], None] | None = None) -> None:
        unknown = set(resources) - _RESOURCE_KEYS
        if unknown:
            raise CgroupError(f"resources: unknown resource {sorted(unknown)[0]!r}")
        # Never applied, as runc 1.1 ignores both: Linux 5.16+ ignores kmem.limit_in_bytes writes, 6.x drops it
        resources = drop_kernel_memory(resources, lambda key: False, warn)
        self._check_supported(resources)
        if resources.get("memory"):
            self._set_memory(resources["memory"])
        if resources.get("cpu"):
            self._set_cpu(resources["cpu"])
        pids = resources.get("pids")
        if pids and present(pids.get("limit")) and pids["limit"] != 0:
            limit = int(pids["limit"])
            write_text(self._dir("pids", "pids") + "/pids.max", str(limit) if limit > 0 else "max", "pids.limit")
        if resources.get("blockIO"):
            self._set_blkio(resources["blockIO"])
        for entry in resources.get("hugepageLimits") or []:
            path = self._dir("hugetlb", "hugepageLimits")
            size = entry["pageSize"]
            write_text(f"{path}/hugetlb.{size}.limit_in_bytes", str(int(entry["limit"])), f"hugepageLimits[{size}]")
        if resources.get("devices") is not None:
            path = self._dir("devices", "devices")
            for allow, line in device_rule_lines(resources["devices"]):
                write_text(path + ("/devices.allow" if allow else "/devices.deny"), line, "devices")
        network = resources.get("network")
        if network:
            if present(network.get("classID")):
                path = self._dir("net_cls", "network.classID")
                write_text(path + "/net_cls.classid", str(int(network["classID"])), "network.classID")
            for prio in network.get("priorities") or []:
                path = self._dir("net_prio", "network.priorities")
                write_text(path + "/net_prio.ifpriomap", f"{prio['name']} {int(prio['priority'])}",
                           "network.priorities")
        for device, limits in (resources.get("rdma") or {}).items():
            path = self._dir("rdma", "rdma")
            write_text(path + "/rdma.max", rdma_line(device, limits), f"rdma[{device}]")

    def _check_supported(self, resources: dict[str, Any]) -> None:
        """Refuse what this host cannot do before writing anything, so a failed create changes nothing."""
        if resources.get("unified"):
            raise CgroupError("unified: cgroup v2 resources cannot be set on a cgroup v1 host")
        memory = resources.get("memory") or {}
        if memory:
            path = self._dir("memory", "memory")
            if present(memory.get("swap")) and not os.path.exists(path + "/memory.memsw.limit_in_bytes"):
                raise CgroupError("memory.swap: swap accounting is not enabled on this host")
        cpu = resources.get("cpu") or {}
        if cpu:
            for key, controller, filename in (
                ("shares", "cpu", "cpu.shares"), ("quota", "cpu", "cpu.cfs_quota_us"),
                ("period", "cpu", "cpu.cfs_period_us"), ("burst", "cpu", "cpu.cfs_burst_us"),
                ("realtimeRuntime", "cpu", "cpu.rt_runtime_us"), ("realtimePeriod", "cpu", "cpu.rt_period_us"),
                ("idle", "cpu", "cpu.idle"), ("cpus", "cpuset", "cpuset.cpus"), ("mems", "cpuset", "cpuset.mems"),
            ):
                if present(cpu.get(key)) and cpu[key] != "":
                    path = self._dir(controller, f"cpu.{key}")
                    if not os.path.exists(f"{path}/{filename}"):
                        raise CgroupError(f"cpu.{key}: not supported by this kernel (no {filename})")
        blkio = resources.get("blockIO") or {}
        if blkio:
            path = self._dir("blkio", "blockIO")
            if weight_set(blkio.get("weight")) and _weight_file(path, "weight") is None:
                raise CgroupError("blockIO.weight: not supported by this kernel (no blkio.weight or blkio.bfq.weight)")
            if weight_set(blkio.get("leafWeight")) and not os.path.exists(path + "/blkio.leaf_weight"):
                raise CgroupError("blockIO.leafWeight: not supported by this kernel (no blkio.leaf_weight)")
            for entry in blkio.get("weightDevice") or []:
                if weight_set(entry.get("weight")) and _weight_file(path, "weight_device") is None:
                    raise CgroupError("blockIO.weightDevice: not supported by this kernel (no blkio.weight_device)")
                if weight_set(entry.get("leafWeight")) and not os.path.exists(path + "/blkio.leaf_weight_device"):
                    raise CgroupError("blockIO.weightDevice.leafWeight: not supported by this kernel")
        if resources.get("hugepageLimits"):
            self._dir("hugetlb", "hugepageLimits")
        network = resources.get("network") or {}
        if present(network.get("classID")):
            self._dir("net_cls", "network.classID")
        if network.get("priorities"):
            self._dir("net_prio", "network.priorities")
        if resources.get("rdma"):
            self._dir("rdma", "rdma")
        if resources.get("devices") is not None:
            self._dir("devices", "devices")
        pids = resources.get("pids") or {}
        if present(pids.get("limit")) and pids["limit"] != 0:
            self._dir("pids", "pids.limit")

    def _set_memory(self, memory: dict[str, Any]) -> None:
        path = self._dir("memory", "memory")
        limit: Any = memory.get("limit")
        swap: Any = memory.get("swap")
        if limit == -1 and swap is None and os.path.exists(path + "/memory.memsw.limit_in_bytes"):
            swap = -1  # "unlimited memory" must lift memory+swap too, or the kernel refuses the write
        if memory.get("checkBeforeUpdate") and present(limit) and limit > 0:
            usage = int(read_text(path + "/memory.usage_in_bytes", "memory").strip())
            if usage >= limit:
                raise CgroupError(f"memory.limit: current usage {usage} is not below the new limit {limit}")
        if present(limit) and present(swap):
            # memory+swap must stay >= memory at every step: try limit first, else swap first.
            try:
                write_text(path + "/memory.limit_in_bytes", str(int(limit)), "memory.limit")
            except CgroupError:
                write_text(path + "/memory.memsw.limit_in_bytes", str(int(swap)), "memory.swap")
                write_text(path + "/memory.limit_in_bytes", str(int(limit)), "memory.limit")
            else:
                write_text(path + "/memory.memsw.limit_in_bytes", str(int(swap)), "memory.swap")
        elif present(limit):
            write_text(path + "/memory.limit_in_bytes", str(int(limit)), "memory.limit")
        elif present(swap):
            write_text(path + "/memory.memsw.limit_in_bytes", str(int(swap)), "memory.swap")
        if present(memory.get("reservation")):
            write_text(path + "/memory.soft_limit_in_bytes", str(int(memory["reservation"])), "memory.reservation")
        swappiness: Any = memory.get("swappiness")
        if present(swappiness):
            if not 0 <= int(swappiness) <= 100:
                raise CgroupError(f"memory.swappiness: {swappiness} is not within 0-100")
            write_text(path + "/memory.swappiness", str(int(swappiness)), "memory.swappiness")
        if memory.get("disableOOMKiller"):
            write_text(path + "/memory.oom_control", "1", "memory.disableOOMKiller")
        if present(memory.get("useHierarchy")):
            write_text(path + "/memory.use_hierarchy", "1" if memory["useHierarchy"] else "0", "memory.useHierarchy")

    def _set_cpu(self, cpu: dict[str, Any]) -> None:
        if present(cpu.get("shares")) and cpu["shares"] != 0:
            write_text(self._dir("cpu", "cpu.shares") + "/cpu.shares", str(int(cpu["shares"])), "cpu.shares")
        period: Any = cpu.get("period")
        quota: Any = cpu.get("quota")
        if present(period) or present(quota):
            path = self._dir("cpu", "cpu.quota")
            writes = []
            if present(period) and period != 0:
                writes.append((path + "/cpu.cfs_period_us", str(int(period)), "cpu.period"))
            if present(quota) and quota != 0:
                writes.append((path + "/cpu.cfs_quota_us", str(int(quota)), "cpu.quota"))
            _write_either_order(writes)
        if present(cpu.get("burst")):
            write_text(self._dir("cpu", "cpu.burst") + "/cpu.cfs_burst_us", str(int(cpu["burst"])), "cpu.burst")
        rt_writes = []
        if present(cpu.get("realtimePeriod")) and cpu["realtimePeriod"] != 0:
            rt_writes.append((self._dir("cpu", "cpu.realtimePeriod") + "/cpu.rt_period_us",
                              str(int(cpu["realtimePeriod"])), "cpu.realtimePeriod"))
        if present(cpu.get("realtimeRuntime")) and cpu["realtimeRuntime"] != 0:
            rt_writes.append((self._dir("cpu", "cpu.realtimeRuntime") + "/cpu.rt_runtime_us",
                              str(int(cpu["realtimeRuntime"])), "cpu.realtimeRuntime"))
        _write_either_order(rt_writes)
        if present(cpu.get("idle")):
            write_text(self._dir("cpu", "cpu.idle") + "/cpu.idle", str(int(cpu["idle"])), "cpu.idle")
        for key in ("cpus", "mems"):
            if cpu.get(key):
                write_text(f"{self._dir('cpuset', f'cpu.{key}')}/cpuset.{key}", str(cpu[key]), f"cpu.{key}")

    def _set_blkio(self, blkio: dict[str, Any]) -> None:
        path = self._dir("blkio", "blockIO")
        if weight_set(blkio.get("weight")):
            write_text(f"{path}/{_weight_file(path, 'weight')}", str(int(blkio["weight"])), "blockIO.weight")
        if weight_set(blkio.get("leafWeight")):
            write_text(path + "/blkio.leaf_weight", str(int(blkio["leafWeight"])), "blockIO.leafWeight")
        for entry in blkio.get("weightDevice") or []:
            device = f"{int(entry['major'])}:{int(entry['minor'])}"
            if weight_set(entry.get("weight")):
                write_text(f"{path}/{_weight_file(path, 'weight_device')}", f"{device} {int(entry['weight'])}",
                           "blockIO.weightDevice")
            if weight_set(entry.get("leafWeight")):
                write_text(path + "/blkio.leaf_weight_device", f"{device} {int(entry['leafWeight'])}",
                           "blockIO.weightDevice")
        for key, filename in (
            ("throttleReadBpsDevice", "blkio.throttle.read_bps_device"),
            ("throttleWriteBpsDevice", "blkio.throttle.write_bps_device"),
            ("throttleReadIOPSDevice", "blkio.throttle.read_iops_device"),
            ("throttleWriteIOPSDevice", "blkio.throttle.write_iops_device"),
        ):
            for entry in blkio.get(key) or []:
                line = f"{int(entry['major'])}:{int(entry['minor'])} {int(entry['rate'])}"
                write_text(f"{path}/{filename}", line, f"blockIO.{key}")

    # --- freezer, processes ------------------------------------------------------------------------

    def freeze(self) -> None:
        path = self._dir("freezer", "freeze") + "/freezer.state"
        deadline = time.monotonic() + 5.0
        delay = 0.0001
        while True:
            # Rewriting FROZEN restarts a freeze that raced with a fork (runc does the same).
            write_text(path, "FROZEN", "freeze")
            if read_text(path, "freeze").strip() == "FROZEN":
                return
            if time.monotonic() >= deadline:
                write_text(path, "THAWED", "freeze")
                raise CgroupError(f"freeze: {path} did not reach FROZEN within 5 s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def thaw(self) -> None:
        write_text(self._dir("freezer", "thaw") + "/freezer.state", "THAWED", "thaw")

    def frozen(self) -> bool:
        from clave.linux import freezer

        return freezer.frozen({"freezer": self._paths["freezer"]}) if "freezer" in self._paths else False

    def _procs_dir(self) -> str:
        for controller in ("pids", "freezer", "memory", "devices", "cpu", UNIFIED_KEY):
            if controller in self._paths:
                return self._paths[controller]
        return self._dirs()[0]

    def pids(self) -> list[int]:
        return procs_recursive(self._procs_dir())

    def kill_all(self, sig: int) -> None:
        unified = self._paths.get(UNIFIED_KEY)
        if sig == SIGKILL and unified and os.path.exists(unified + "/cgroup.kill"):
            write_text(unified + "/cgroup.kill", "1", "kill")
            return
        if "freezer" not in self._paths or not os.path.isdir(self._paths["freezer"]):
            signal_pids(self.pids(), sig)
            return
        # Freeze first so no task forks a new one between listing and signalling.
        self.freeze()
        try:
            signal_pids(self.pids(), sig)
        finally:
            self.thaw()

    # --- observation -------------------------------------------------------------------------------

    def oom_kill_count(self) -> int:
        path = self._paths.get("memory")
        if path is None:
            return 0
        text = read_optional(path + "/memory.oom_control")
        return parse_flat_keyed(text).get("oom_kill", 0) if text else 0

    def stats(self) -> dict[str, Any]:
        from clave.linux.cgroups import stats as statsmod  # only `events --stats` needs it

        out: dict[str, Any] = {}
        if "cpuacct" in self._paths or "cpu" in self._paths:
            out["cpu"] = statsmod.cpu_v1(self._paths.get("cpuacct"), self._paths.get("cpu"))
        if "memory" in self._paths:
            out["memory"] = statsmod.memory_v1(self._paths["memory"])
        if "pids" in self._paths:
            out["pids"] = statsmod.pids(self._paths["pids"])
        if "blkio" in self._paths:
            out["blkio"] = statsmod.blkio_v1(self._paths["blkio"])
        if "hugetlb" in self._paths:
            out["hugetlb"] = statsmod.hugetlb(self._paths["hugetlb"], v2=False)
        if "cpuset" in self._paths:
            out["cpuset"] = statsmod.cpuset(self._paths["cpuset"])
        return out


def _weight_file(path: str, kind: str) -> str | None:
    """blkio.bfq.<kind> (BFQ scheduler, kernels >= 5.0) or the CFQ blkio.<kind>, whichever exists."""
    for name in (f"blkio.bfq.{kind}", f"blkio.{kind}"):
        if os.path.exists(f"{path}/{name}"):
            return name
    return None


def _write_either_order(writes: list[tuple[str, str, str]]) -> None:
    """Two dependent values (period/quota, rt period/runtime): if the first write is refused, swap order."""
    if len(writes) < 2:
        for path, value, what in writes:
            write_text(path, value, what)
        return
    try:
        write_text(*writes[0])
    except CgroupError:
        write_text(*writes[1])
        write_text(*writes[0])
    else:
        write_text(*writes[1])


def rdma_line(device: str, limits: dict[str, Any]) -> str:
    parts = [device]
    if present(limits.get("hcaHandles")):
        parts.append(f"hca_handle={int(limits['hcaHandles'])}")
    if present(limits.get("hcaObjects")):
        parts.append(f"hca_object={int(limits['hcaObjects'])}")
    return " ".join(parts)
