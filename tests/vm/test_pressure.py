"""The agent's decision to end a container thrashing at its memory limit (clave.vm.agent.pressure); the PSI
trigger itself is exercised in the guest (tests/vm/test_vm.py, tests/interop/test_cri_vm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clave.vm.agent.pressure import NEAR_LIMIT, _kill_if_at_limit


@pytest.mark.parametrize(("limit", "current", "killed"), [
    (str(32 << 20), (32 << 20) - 4096, True),  # at its limit: killed
    (str(32 << 20), (32 << 20) - NEAR_LIMIT, True),
    (str(32 << 20), (32 << 20) - NEAR_LIMIT - 1, False),  # below it: stalled on something else
    ("max", 1 << 30, False),  # the limit was lifted meanwhile
])
def test_only_a_cgroup_at_its_limit_is_killed(tmp_path: Path, limit: str, current: int, killed: bool) -> None:
    (tmp_path / "memory.max").write_text(f"{limit}\n")
    (tmp_path / "memory.current").write_text(f"{current}\n")
    (tmp_path / "cgroup.kill").write_text("")
    assert _kill_if_at_limit(str(tmp_path)) is killed
    assert (tmp_path / "cgroup.kill").read_text() == ("1" if killed else "")


def test_a_vanished_cgroup_is_not_killed(tmp_path: Path) -> None:
    assert _kill_if_at_limit(str(tmp_path / "gone")) is False
