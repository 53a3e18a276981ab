"""Readers that turn cgroup files into runc's ``events --stats`` data shape (runc types/events.go names).

Each reader returns only what the host has; a missing file leaves its field out rather than reporting 0.
"""

from __future__ import annotations

from clave.linux.cgroups.common import hugepage_sizes, parse_flat_keyed, parse_int, read_optional

TYPE_CHECKING = False  # typing is not imported at run time: start-up latency matters
if TYPE_CHECKING:
    from typing import Any

_USER_HZ = 100  # cpuacct.stat counts clock ticks (USER_HZ is 100 on every Linux ABI)


def _u64(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return None


def _ints(text: str | None) -> list[int]:
    return [int(v) for v in text.split()] if text else []


# --- cpu --------------------------------------------------------------------------------------------


def cpu_v1(cpuacct: str | None, cpu: str | None) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    if cpuacct:
        total = _u64(read_optional(cpuacct + "/cpuacct.usage"))
        if total is not None:
            usage["total"] = total
        percpu = _ints(read_optional(cpuacct + "/cpuacct.usage_percpu"))
        if percpu:
            usage["percpu"] = percpu
        kernel_percpu = _ints(read_optional(cpuacct + "/cpuacct.usage_percpu_sys"))
        user_percpu = _ints(read_optional(cpuacct + "/cpuacct.usage_percpu_user"))
        if kernel_percpu:
            usage["percpu_kernel"] = kernel_percpu
        if user_percpu:
            usage["percpu_user"] = user_percpu
        user_ns = _u64(read_optional(cpuacct + "/cpuacct.usage_user"))
        sys_ns = _u64(read_optional(cpuacct + "/cpuacct.usage_sys"))
        if user_ns is not None and sys_ns is not None:
            usage["user"], usage["kernel"] = user_ns, sys_ns
        else:
            ticks = parse_flat_keyed(read_optional(cpuacct + "/cpuacct.stat") or "")
            usage["user"] = ticks.get("user", 0) * (1_000_000_000 // _USER_HZ)
            usage["kernel"] = ticks.get("system", 0) * (1_000_000_000 // _USER_HZ)
    out: dict[str, Any] = {"usage": usage}
    if cpu:
        stat = parse_flat_keyed(read_optional(cpu + "/cpu.stat") or "")
        out["throttling"] = {
            "periods": stat.get("nr_periods", 0),
            "throttledPeriods": stat.get("nr_throttled", 0),
            "throttledTime": stat.get("throttled_time", 0),
        }
    return out


def cpu_v2(path: str) -> dict[str, Any]:
    stat = parse_flat_keyed(read_optional(path + "/cpu.stat") or "")
    out: dict[str, Any] = {
        "usage": {
            "total": stat.get("usage_usec", 0) * 1000,
            "user": stat.get("user_usec", 0) * 1000,
            "kernel": stat.get("system_usec", 0) * 1000,
        }
    }
    if "nr_periods" in stat:
        out["throttling"] = {
            "periods": stat.get("nr_periods", 0),
            "throttledPeriods": stat.get("nr_throttled", 0),
            "throttledTime": stat.get("throttled_usec", 0) * 1000,
        }
    psi = psi_stats(path + "/cpu.pressure")
    if psi:
        out["psi"] = psi
    return out


def psi_stats(path: str) -> dict[str, Any] | None:
    """``some avg10=.. avg60=.. avg300=.. total=..`` lines as runc's PSIStats."""
    text = read_optional(path)
    if not text:
        return None
    out: dict[str, Any] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        data: dict[str, Any] = {}
        for pair in rest.split():
            key, _, value = pair.partition("=")
            data[key] = int(value) if key == "total" else float(value)
        out[kind] = data
    return out


# --- memory -----------------------------------------------------------------------------------------


def _entry_v1(path: str, prefix: str) -> dict[str, int] | None:
    usage = _u64(read_optional(f"{path}/{prefix}.usage_in_bytes"))
    if usage is None:
        return None
    return {
        "limit": _u64(read_optional(f"{path}/{prefix}.limit_in_bytes")) or 0,
        "usage": usage,
        "max": _u64(read_optional(f"{path}/{prefix}.max_usage_in_bytes")) or 0,
        "failcnt": _u64(read_optional(f"{path}/{prefix}.failcnt")) or 0,
    }


def memory_v1(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    raw = parse_flat_keyed(read_optional(path + "/memory.stat") or "")
    if raw:
        out["raw"] = raw
        out["cache"] = raw.get("cache", 0)
    for key, prefix in (("usage", "memory"), ("swap", "memory.memsw"), ("kernel", "memory.kmem"),
                        ("kernelTCP", "memory.kmem.tcp")):
        entry = _entry_v1(path, prefix)
        if entry is not None:
            out[key] = entry
    out["event_count"] = memory_events_v1(path)
    return out


def memory_events_v1(path: str) -> dict[str, int]:
    control = parse_flat_keyed(read_optional(path + "/memory.oom_control") or "")
    return {"oom_kill": control.get("oom_kill", 0)}


def memory_v2(path: str) -> dict[str, Any] | None:
    current = _u64(read_optional(path + "/memory.current"))
    if current is None:
        return None  # memory controller not enabled here
    out: dict[str, Any] = {}
    raw = parse_flat_keyed(read_optional(path + "/memory.stat") or "")
    if raw:
        out["raw"] = raw
        out["cache"] = raw.get("file", 0)
    events = parse_flat_keyed(read_optional(path + "/memory.events") or "")
    limit = parse_int(read_optional(path + "/memory.max"), max_as=_u64_max())
    out["usage"] = {
        "limit": limit,
        "usage": current,
        "max": _u64(read_optional(path + "/memory.peak")) or 0,
        "failcnt": events.get("max", 0),
    }
    swap_current = _u64(read_optional(path + "/memory.swap.current"))
    if swap_current is not None:
        # runc reports v2 swap like v1 memsw: memory plus swap
        swap_max = parse_int(read_optional(path + "/memory.swap.max"), max_as=_u64_max())
        swap_limit = _u64_max() if swap_max == _u64_max() or limit == _u64_max() else swap_max + limit
        out["swap"] = {"limit": swap_limit, "usage": swap_current + current,
                       "max": _u64(read_optional(path + "/memory.swap.peak")) or 0,
                       "failcnt": parse_flat_keyed(read_optional(path + "/memory.swap.events") or "").get("max", 0)}
    out["event_count"] = {k: events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")}
    psi = psi_stats(path + "/memory.pressure")
    if psi:
        out["psi"] = psi
    return out


def _u64_max() -> int:
    return (1 << 64) - 1


# --- pids, blkio, hugetlb, cpuset -------------------------------------------------------------------


def pids(path: str) -> dict[str, int] | None:
    current = _u64(read_optional(path + "/pids.current"))
    if current is None:
        return None
    return {"current": current, "limit": parse_int(read_optional(path + "/pids.max"), max_as=0)}


def _blkio_entries(text: str | None) -> list[dict[str, Any]] | None:
    if text is None:
        return None
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:  # "8:0 Read 4096"
            major, _, minor = fields[0].partition(":")
            entries.append({"major": int(major), "minor": int(minor), "op": fields[1], "value": int(fields[2])})
        elif len(fields) == 2 and ":" in fields[0]:  # "8:0 4096" (sectors, time)
            major, _, minor = fields[0].partition(":")
            entries.append({"major": int(major), "minor": int(minor), "op": "", "value": int(fields[1])})
    return entries


def blkio_v1(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # CFQ files first, then BFQ, then the throttle layer (which counts every I/O) - as runc.
    for key, name in (("ioServiceBytesRecursive", "io_service_bytes_recursive"),
                      ("ioServicedRecursive", "io_serviced_recursive")):
        for prefix in ("blkio.", "blkio.bfq.", "blkio.throttle."):
            entries = _blkio_entries(read_optional(f"{path}/{prefix}{name}"))
            if entries is not None:
                out[key] = entries
                break
    for key, name in (("ioQueueRecursive", "io_queued_recursive"),
                      ("ioServiceTimeRecursive", "io_service_time_recursive"),
                      ("ioWaitTimeRecursive", "io_wait_time_recursive"),
                      ("ioMergedRecursive", "io_merged_recursive"), ("ioTimeRecursive", "time_recursive"),
                      ("sectorsRecursive", "sectors_recursive")):
        entries = _blkio_entries(read_optional(f"{path}/blkio.{name}"))
        if entries:
            out[key] = entries
    return out


def blkio_v2(path: str) -> dict[str, Any] | None:
    text = read_optional(path + "/io.stat")
    if text is None:
        return None
    service_bytes: list[dict[str, Any]] = []
    serviced: list[dict[str, Any]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        major, _, minor = fields[0].partition(":")
        for pair in fields[1:]:
            key, _, value = pair.partition("=")
            table, op = {
                "rbytes": (service_bytes, "Read"), "wbytes": (service_bytes, "Write"),
                "rios": (serviced, "Read"), "wios": (serviced, "Write"),
            }.get(key, (None, ""))
            if table is not None:
                table.append({"major": int(major), "minor": int(minor), "op": op, "value": int(value)})
    out: dict[str, Any] = {"ioServiceBytesRecursive": service_bytes, "ioServicedRecursive": serviced}
    psi = psi_stats(path + "/io.pressure")
    if psi:
        out["psi"] = psi
    return out


def hugetlb(path: str, *, v2: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in hugepage_sizes():
        if v2:
            usage = _u64(read_optional(f"{path}/hugetlb.{size}.current"))
            if usage is None:
                continue
            events = parse_flat_keyed(read_optional(f"{path}/hugetlb.{size}.events") or "")
            out[size] = {"usage": usage, "max": parse_int(read_optional(f"{path}/hugetlb.{size}.max")),
                         "failcnt": events.get("max", 0)}
        else:
            usage = _u64(read_optional(f"{path}/hugetlb.{size}.usage_in_bytes"))
            if usage is None:
                continue
            out[size] = {"usage": usage, "max": _u64(read_optional(f"{path}/hugetlb.{size}.max_usage_in_bytes")) or 0,
                         "failcnt": _u64(read_optional(f"{path}/hugetlb.{size}.failcnt")) or 0}
    return out


def _cpu_list(text: str | None) -> list[int]:
    """``0-3,5`` -> [0, 1, 2, 3, 5]"""
    out: list[int] = []
    for part in (text or "").strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def cpuset(path: str) -> dict[str, Any]:
    cpus = _cpu_list(read_optional(path + "/cpuset.effective_cpus") or read_optional(path + "/cpuset.cpus"))
    mems = _cpu_list(read_optional(path + "/cpuset.effective_mems") or read_optional(path + "/cpuset.mems"))
    out: dict[str, Any] = {}
    if cpus:
        out["cpus"] = cpus
    if mems:
        out["mems"] = mems
    return out
