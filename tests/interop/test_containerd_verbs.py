"""containerd's runc.v2 shim with clave as its runtime binary, beyond run/kill: `ctr task exec` (output and
exit status), `ctr task ps`, `pause`/`resume`, `metrics`, `kill`, `delete` and `ctr container rm`, against one
long-running container (`ctr run -d --runc-binary clave --rootfs DIR ID sleep 300`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import wait_for  # tests/interop is not a package: its conftest is top-level

if TYPE_CHECKING:
    from conftest import Containerd


def _task_status(containerd: Containerd, container_id: str) -> str | None:
    for line in containerd.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return fields[2]
    return None


from helpers import alive as _alive  # noqa: E402


@pytest.fixture(scope="module")
def running(containerd: Containerd, clave: Path, busybox_rootfs: Path) -> Iterator[str]:
    """A detached container running `sleep 300`; removed by the last test (or here, if a test failed)."""
    container_id = f"verbs-{uuid.uuid4().hex[:6]}"
    containerd.ctr("run", "-d", "--runc-binary", str(clave), "--rootfs", str(busybox_rootfs), container_id,
                   "sleep", "300", check=True)
    wait_for(lambda: _task_status(containerd, container_id) == "RUNNING", "the task to run")
    yield container_id
    if container_id in containerd.task_ids():
        containerd.ctr("task", "kill", "-s", "SIGKILL", container_id)
        containerd.ctr("task", "delete", "--force", container_id)
    if container_id in containerd.container_ids():
        containerd.ctr("container", "rm", container_id)


def test_task_exec_output_and_exit_status(containerd: Containerd, running: str) -> None:
    result = containerd.ctr("task", "exec", "--exec-id", "hello", running, "sh", "-c",
                            "echo pid1=$(cat /proc/1/comm); echo err >&2; exit 5")
    assert result.stdout == "pid1=sleep\n", result.stderr
    assert "err" in result.stderr
    assert result.returncode == 5
    ok = containerd.ctr("task", "exec", "--exec-id", "id", running, "id", "-u")
    assert (ok.returncode, ok.stdout) == (0, "0\n"), ok.stderr


def test_task_ps_lists_the_container_processes(containerd: Containerd, running: str) -> None:
    rows = containerd.ctr("task", "ps", running, check=True).stdout.splitlines()
    assert rows[0].split()[0] == "PID"
    pids = [int(row.split()[0]) for row in rows[1:]]
    assert len(pids) == 1 and _alive(pids[0])
    assert Path(f"/proc/{pids[0]}/comm").read_text().strip() == "sleep"


def test_task_pause_and_resume(containerd: Containerd, running: str) -> None:
    containerd.ctr("task", "pause", running, check=True)
    try:
        assert _task_status(containerd, running) == "PAUSED"
        pid = int(containerd.ctr("task", "ps", running, check=True).stdout.splitlines()[1].split()[0])
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("D", "S", "T"), state  # frozen by the cgroup freezer
    finally:
        containerd.ctr("task", "resume", running, check=True)
    assert _task_status(containerd, running) == "RUNNING"
    after = containerd.ctr("task", "exec", "--exec-id", "after-resume", running, "echo", "thawed")
    assert after.stdout == "thawed\n", after.stderr


def test_task_metrics_shows_memory_and_cpu(containerd: Containerd, running: str) -> None:
    text = containerd.ctr("task", "metrics", running, check=True).stdout
    metrics = dict(line.split(None, 1) for line in text.splitlines() if line.count(" ") and "." in line.split()[0])
    # cgroup v1 names (memory.usage_in_bytes, cpuacct.usage) or v2 names (memory.usage, cpu.usage_usec).
    memory = next((v for k, v in metrics.items() if k.startswith("memory.usage")), "0")
    cpu = next((v for k, v in metrics.items() if k in ("cpuacct.usage", "cpu.usage_usec")), "0")
    assert int(memory.split()[0]) > 0 and int(cpu.split()[0]) > 0, text
    assert metrics.get("pids.current", "").strip() == "1", text


def test_task_kill_delete_and_container_rm(containerd: Containerd, running: str) -> None:
    pid = int(containerd.ctr("task", "ps", running, check=True).stdout.splitlines()[1].split()[0])
    # SIGKILL: pid 1 of a pid namespace ignores SIGTERM unless it handles it, as sleep does not.
    containerd.ctr("task", "kill", "-s", "SIGKILL", running, check=True)
    wait_for(lambda: _task_status(containerd, running) == "STOPPED", "the task to stop")
    containerd.ctr("task", "delete", running, check=True)
    assert running not in containerd.task_ids()
    containerd.ctr("container", "rm", running, check=True)
    assert running not in containerd.container_ids()
    assert not (containerd.runc_root / running).exists(), "clave state left under the shim's runc root"
    assert containerd.cgroups(running) == []
    wait_for(lambda: not _alive(pid), "the container's process to be gone")
    wait_for(lambda: not containerd.shims(running), "the shim to exit")
