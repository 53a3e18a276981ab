"""rlimits, personality and oom_score_adj, applied in forked children."""

from __future__ import annotations

import os
import resource
from typing import Any

import pytest
from forkchild import run_in_child

from clave.linux import capabilities as caps
from clave.linux import procattrs, rlimits

INFINITY = (1 << 64) - 1


def _without_sys_resource() -> None:
    """Drop CAP_SYS_RESOURCE from every set, as on the hosts Clave targets."""
    status = caps.current()
    keep = caps.names(status["CapEff"] & ~(1 << caps.CAPABILITIES["CAP_SYS_RESOURCE"]))
    caps.apply({"bounding": keep, "effective": keep, "permitted": keep})


def test_lowering_nofile_works() -> None:
    def child() -> Any:
        rlimits.apply([{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200},
                       {"type": "RLIMIT_CORE", "soft": 0, "hard": INFINITY}])
        return [resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_CORE)]

    nofile, core = run_in_child(child).ok()
    assert nofile == [100, 200]
    assert core[0] == 0 and core[1] in (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_CORE)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop capabilities")
def test_raising_above_the_hard_limit_says_cap_sys_resource_is_missing() -> None:
    def child() -> Any:
        _without_sys_resource()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        try:
            rlimits.apply([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard + 1}])
        except rlimits.RlimitError as exc:
            return str(exc)
        return "raised"

    message = run_in_child(child).ok()
    assert "RLIMIT_NOFILE" in message and "CAP_SYS_RESOURCE" in message and "\n" not in message


def test_invalid_entries_are_errors() -> None:
    cases = [
        ([{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}], "RLIMIT_BOGUS"),
        ([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}], "soft limit 10 is above the hard limit 5"),
        ([{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 5}], "soft limit -1"),
        ([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}] * 2, "listed twice"),
    ]
    for entries, needle in cases:
        with pytest.raises(rlimits.RlimitError, match=needle):
            rlimits.parse(entries)


def test_personality_linux32_changes_uname() -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("LINUX32 reports i686 only on x86_64")

    def child() -> Any:
        procattrs.personality({"domain": "LINUX32"})
        return [os.uname().machine, procattrs.current_personality() & 0xFF]

    assert run_in_child(child).ok() == ["i686", 0x08]
    with pytest.raises(procattrs.ProcAttrError, match="LINUX64"):
        procattrs.personality({"domain": "LINUX64"})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop capabilities")
def test_oom_score_adj_raise_works_and_lowering_needs_cap_sys_resource() -> None:
    def child() -> Any:
        _without_sys_resource()
        with open("/proc/self/oom_score_adj") as f:
            start = int(f.read())
        procattrs.set_oom_score_adj(min(start + 100, 1000))
        with open("/proc/self/oom_score_adj") as f:
            raised = int(f.read())
        try:
            procattrs.set_oom_score_adj(-1000)
        except procattrs.ProcAttrError as exc:
            return [start, raised, str(exc)]
        return [start, raised, "lowered"]

    start, raised, lowered = run_in_child(child).ok()
    assert raised == min(start + 100, 1000)
    assert "CAP_SYS_RESOURCE" in lowered
    with pytest.raises(procattrs.ProcAttrError, match="-1000..1000"):
        procattrs.set_oom_score_adj(5000)
