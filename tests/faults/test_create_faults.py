"""Faults: `kill -9` of clave at each step of `create` leaves a state `delete --force` cleans completely, and
many concurrent create/start/kill/delete cycles leave nothing behind.

The runtime stops itself (SIGSTOP) at a named step when CLAVE_TEST_PAUSE_AT names it; the test then kills it
with SIGKILL, so the crash lands exactly there."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from security.harness import CLAVE, Runner, cgroup_hierarchies, processes_in_cgroup, wait_for_nothing

CREATE_STEPS = ["after-state-dir", "after-cgroup", "after-fork", "after-hooks", "before-pid-file"]


def wait_stopped(pid: int, proc: subprocess.Popen[bytes], stderr: Path, timeout: float = 15.0) -> None:
    """Wait until ``pid`` is stopped by a signal (state T); fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"clave exited ({proc.returncode}) before pausing: {stderr.read_text().strip()}")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"clave did not reach its pause point within {timeout} s")


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_kill_9_during_create_then_delete_force_cleans_everything(runner: Runner, step: str) -> None:
    container_id = f"crash-{step}"
    config = runner.config("sleep", "300")
    # A prestart hook makes the runtime-hook round trip part of what is interrupted.
    config["hooks"] = {"prestart": [{"path": "/bin/true"}]}
    bundle = runner.bundle(container_id, config)
    env = {**os.environ, "CLAVE_TEST_PAUSE_AT": step}
    with open(bundle / "create.err", "w+") as err:  # a file, not a pipe: the container inherits it
        create = subprocess.Popen(
            [CLAVE, "--root", str(runner.root), "create", "--bundle", str(bundle), "--pid-file",
             str(bundle / "init.pid"), container_id],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        wait_stopped(create.pid, create, bundle / "create.err")
        in_cgroup = processes_in_cgroup(f"/{runner.group}/{container_id}")
    finally:
        create.kill()
        create.wait()
    if step in ("after-fork", "after-hooks", "before-pid-file"):
        assert in_cgroup, "the container's init should exist at this step"
    assert (runner.root / container_id).is_dir(), "create had recorded its state dir at this step"

    result = runner.clave("delete", "--force", container_id)
    assert result.returncode == 0, result.stderr
    assert wait_for_nothing(lambda: runner.leftovers(container_id)) == []
    assert not [pid for pid in in_cgroup if os.path.exists(f"/proc/{pid}") and _not_zombie(pid)]
    assert not (bundle / "init.pid").exists() or step == "before-pid-file"


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


CYCLES = 50
WORKERS = 8


def test_concurrent_create_start_delete_cycles_leave_nothing(runner: Runner) -> None:
    def cycle(index: int) -> str:
        container_id = f"cycle-{index}"
        bundle = runner.bundle(container_id, runner.config("sleep", "300"))
        pid_file = bundle / "init.pid"
        error = runner.create(container_id, bundle, "--pid-file", str(pid_file))
        if error:
            return f"{container_id} create: {error}"
        for args in (["start", container_id], ["kill", container_id, "KILL"]):
            result = runner.clave(*args)
            if result.returncode != 0:
                return f"{container_id} {args[0]}: {result.stderr.strip()}"
        init_pid = int(pid_file.read_text())
        try:
            os.waitpid(init_pid, 0)  # we are the subreaper: the killed init is our child to reap
        except ChildProcessError:
            pass
        result = runner.clave("delete", container_id)
        if result.returncode != 0:
            return f"{container_id} delete: {result.stderr.strip()}"
        return ""

    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [f for f in pool.map(cycle, range(CYCLES)) if f]
    assert failures == []
    for index in range(CYCLES):
        assert runner.leftovers(f"cycle-{index}") == []
    assert list(runner.root.iterdir()) == []
    for hierarchy in cgroup_hierarchies():
        group = hierarchy / runner.group
        assert not group.is_dir() or [p.name for p in group.iterdir() if p.is_dir()] == []
