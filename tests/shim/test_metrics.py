"""The shim's statistics conversion: the engine's runc-style stats into containerd's v1 and v2 Metrics, through
their protobuf encoding (what containerd decodes)."""

from __future__ import annotations

from clave.proto.generated import io_containerd_cgroups_v1 as v1
from clave.proto.generated import io_containerd_cgroups_v2 as v2
from clave.shim.metrics import to_metrics, to_metrics_v2

STATS = {
    "cpu": {"usage": {"total": 5_000_000, "percpu": [3_000_000, 2_000_000], "kernel": 1_000_000, "user": 4_000_000},
            "throttling": {"periods": 10, "throttledPeriods": 2, "throttledTime": 7_000}},
    "memory": {"usage": {"limit": 64 << 20, "usage": 1 << 20, "max": 2 << 20, "failcnt": 1},
               "swap": {"limit": 128 << 20, "usage": 3 << 20, "max": 0, "failcnt": 0},
               "raw": {"cache": 4096, "rss": 8192, "pgfault": 11, "total_pgmajfault": 2, "anon": 8192, "file": 4096,
                       "hierarchical_memsw_limit": 99, "swap": 5},
               "event_count": {"low": 0, "high": 1, "max": 2, "oom": 3, "oom_kill": 1}},
    "pids": {"current": 3, "limit": 50},
    "blkio": {"ioServiceBytesRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 4096},
                                          {"major": 8, "minor": 0, "op": "Write", "value": 512}],
              "ioServicedRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 2}]},
    "hugetlb": {"2MB": {"usage": 0, "max": 0, "failcnt": 0}},
    "network_interfaces": [{"name": "lo", "rx_bytes": 10, "rx_packets": 1, "rx_errors": 0, "rx_dropped": 0,
                            "tx_bytes": 10, "tx_packets": 1, "tx_errors": 0, "tx_dropped": 0}],
}


def test_v1_metrics() -> None:
    m = v1.Metrics.decode(to_metrics(STATS).encode())
    assert m.cpu is not None and m.cpu.usage is not None
    assert m.cpu.usage.total == 5_000_000 and m.cpu.usage.per_cpu == [3_000_000, 2_000_000]
    assert m.cpu.throttling is not None and m.cpu.throttling.throttled_periods == 2
    assert m.memory is not None and m.memory.usage is not None and m.memory.usage.limit == 64 << 20
    assert m.memory.cache == 4096 and m.memory.rss == 8192 and m.memory.pg_fault == 11
    assert m.memory.total_pg_maj_fault == 2 and m.memory.hierarchical_swap_limit == 99
    assert m.memory.swap is not None and m.memory.swap.usage == 3 << 20  # the message, not raw "swap"
    assert m.pids is not None and (m.pids.current, m.pids.limit) == (3, 50)
    assert m.blkio is not None and [(e.op, e.value) for e in m.blkio.io_service_bytes_recursive] == [
        ("Read", 4096), ("Write", 512)]
    assert [h.pagesize for h in m.hugetlb] == ["2MB"]
    assert [(n.name, n.rx_bytes) for n in m.network] == [("lo", 10)]


def test_v2_metrics() -> None:
    m = v2.Metrics.decode(to_metrics_v2(STATS).encode())
    assert m.cpu is not None and (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (5000, 4000, 1000)
    assert m.cpu.nr_throttled == 2 and m.cpu.throttled_usec == 7
    assert m.memory is not None and (m.memory.usage, m.memory.usage_limit) == (1 << 20, 64 << 20)
    assert m.memory.swap_usage == 3 << 20 and m.memory.anon == 8192 and m.memory.pgfault == 11
    assert m.memory_events is not None and (m.memory_events.oom, m.memory_events.oom_kill) == (3, 1)
    assert m.io is not None and [(e.major, e.rbytes, e.wbytes, e.rios) for e in m.io.usage] == [(8, 4096, 512, 2)]
    assert m.pids is not None and m.pids.limit == 50
