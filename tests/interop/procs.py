"""Processes and cgroups for the tests that run real daemons: find processes by argv, stop them by pid, poll
for a condition, find a cgroup in every mounted hierarchy. Plain functions, shared by tests/interop's conftest,
its CRI harness (tests/interop/cri/cri_harness.py) and tests/k8s."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(relative: str) -> list[Path]:
    """Every existing cgroup directory named ``relative`` in each mounted hierarchy (v1, hybrid or v2)."""
    roots = [CGROUP_ROOT] if (CGROUP_ROOT / "cgroup.controllers").exists() else []
    if not roots:
        roots = [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    return [root / relative for root in roots if (root / relative).is_dir()]


def process_argvs() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; quiet if the process is already gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
