"""Container statistics (the engine's runc-style stats) as containerd's cgroups v1 ``Metrics`` message, with the
network interfaces included (CRI's stats lack them)."""

from __future__ import annotations

from clave.proto.generated import io_containerd_cgroups_v1 as m

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BLKIO_FIELDS = {
    "ioServiceBytesRecursive": "io_service_bytes_recursive",
    "ioServicedRecursive": "io_serviced_recursive",
    "ioQueuedRecursive": "io_queued_recursive",
    "ioServiceTimeRecursive": "io_service_time_recursive",
    "ioWaitTimeRecursive": "io_wait_time_recursive",
    "ioMergedRecursive": "io_merged_recursive",
    "ioTimeRecursive": "io_time_recursive",
    "sectorsRecursive": "sectors_recursive",
}


def _entry(d: dict[str, Any] | None) -> m.MemoryEntry | None:
    if not d:
        return None
    return m.MemoryEntry(limit=d.get("limit", 0), usage=d.get("usage", 0), max=d.get("max", 0),
                         failcnt=d.get("failcnt", 0))


def to_metrics(stats: dict[str, Any]) -> m.Metrics:
    metrics = m.Metrics()
    cpu = stats.get("cpu")
    if cpu:
        usage = cpu.get("usage", {})
        throttling = cpu.get("throttling", {})
        metrics.cpu = m.CPUStat(
            usage=m.CPUUsage(total=usage.get("total", 0), kernel=usage.get("kernel", 0), user=usage.get("user", 0),
                             per_cpu=list(usage.get("percpu", []))),
            throttling=m.Throttle(periods=throttling.get("periods", 0),
                                  throttled_periods=throttling.get("throttledPeriods", 0),
                                  throttled_time=throttling.get("throttledTime", 0)),
        )
    memory = stats.get("memory")
    if memory:
        raw = memory.get("raw", {})
        stat = m.MemoryStat(usage=_entry(memory.get("usage")), swap=_entry(memory.get("swap")),
                            kernel=_entry(memory.get("kernel")), kernel_tcp=_entry(memory.get("kernelTCP")))
        for key, value in raw.items():
            # memory.stat names -> the message's (pgpgin -> pg_pg_in, hierarchical_memsw_limit -> ..._swap_...)
            field = (key.replace("pgpgin", "pg_pg_in").replace("pgpgout", "pg_pg_out")
                     .replace("pgmajfault", "pg_maj_fault").replace("pgfault", "pg_fault").replace("memsw", "swap"))
            if field in m.MemoryStat.__slots__ and isinstance(getattr(stat, field), int) and isinstance(value, int):
                setattr(stat, field, value)
        metrics.memory = stat
    pids = stats.get("pids")
    if pids:
        metrics.pids = m.PidsStat(current=pids.get("current", 0), limit=pids.get("limit", 0))
    blkio = stats.get("blkio")
    if blkio:
        stat_io = m.BlkIOStat()
        for src, dst in _BLKIO_FIELDS.items():
            setattr(stat_io, dst, [m.BlkIOEntry(op=e.get("op", ""), major=e.get("major", 0), minor=e.get("minor", 0),
                                                value=e.get("value", 0)) for e in blkio.get(src, [])])
        metrics.blkio = stat_io
    for size, h in (stats.get("hugetlb") or {}).items():
        metrics.hugetlb.append(m.HugetlbStat(usage=h.get("usage", 0), max=h.get("max", 0),
                                             failcnt=h.get("failcnt", 0), pagesize=size))
    for n in stats.get("network_interfaces", []):
        metrics.network.append(m.NetworkStat(**{k: n.get(k, 0) for k in m.NetworkStat.__slots__ if k != "name"},
                                             name=n["name"]))
    return metrics


def to_metrics_v2(stats: dict[str, Any]) -> Any:
    """The same statistics as containerd's cgroups v2 ``Metrics`` (what it expects from a shim on a v2 host)."""
    from clave.proto.generated import io_containerd_cgroups_v2 as v2

    metrics = v2.Metrics()
    cpu = stats.get("cpu")
    if cpu:
        usage, throttling = cpu.get("usage", {}), cpu.get("throttling", {})
        metrics.cpu = v2.CPUStat(
            usage_usec=usage.get("total", 0) // 1000, user_usec=usage.get("user", 0) // 1000,
            system_usec=usage.get("kernel", 0) // 1000, nr_periods=throttling.get("periods", 0),
            nr_throttled=throttling.get("throttledPeriods", 0),
            throttled_usec=throttling.get("throttledTime", 0) // 1000,
        )
    memory = stats.get("memory")
    if memory:
        stat = v2.MemoryStat(usage=memory.get("usage", {}).get("usage", 0),
                             usage_limit=memory.get("usage", {}).get("limit", 0),
                             swap_usage=memory.get("swap", {}).get("usage", 0),
                             swap_limit=memory.get("swap", {}).get("limit", 0))
        for key, value in memory.get("raw", {}).items():
            if key in v2.MemoryStat.__slots__ and isinstance(getattr(stat, key), int) and isinstance(value, int):
                setattr(stat, key, value)
        metrics.memory = stat
        events = memory.get("event_count")
        if events:
            metrics.memory_events = v2.MemoryEvents(**{k: events.get(k, 0) for k in v2.MemoryEvents.__slots__})
    pids = stats.get("pids")
    if pids:
        metrics.pids = v2.PidsStat(current=pids.get("current", 0), limit=pids.get("limit", 0))
    blkio = stats.get("blkio")
    if blkio:
        devices: dict[tuple[int, int], Any] = {}
        for field, reads, writes in (("ioServiceBytesRecursive", "rbytes", "wbytes"),
                                     ("ioServicedRecursive", "rios", "wios")):
            for e in blkio.get(field, []):
                entry = devices.setdefault((e.get("major", 0), e.get("minor", 0)),
                                           v2.IOEntry(major=e.get("major", 0), minor=e.get("minor", 0)))
                op = e.get("op", "").lower()
                if op == "read":
                    setattr(entry, reads, e.get("value", 0))
                elif op == "write":
                    setattr(entry, writes, e.get("value", 0))
        metrics.io = v2.IOStat(usage=list(devices.values()))
    for size, h in (stats.get("hugetlb") or {}).items():
        metrics.hugetlb.append(v2.HugeTlbStat(current=h.get("usage", 0), max=h.get("max", 0), pagesize=size))
    return metrics
