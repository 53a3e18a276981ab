"""containerd 1.6 (Debian) drives clave as the runc binary of its runc.v2 shim: `ctr run --runc-binary clave
--rootfs DIR`. Checks output, exit status, kill, delete, the flags the shim passes, error reporting through
log.json, and that nothing is left behind (runtime state, cgroup, shim, container process)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import wait_for  # tests/interop is not a package: its conftest is top-level

if TYPE_CHECKING:
    from conftest import Containerd


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _run_args(clave: Path, rootfs: Path, option: str, container_id: str, *command: str) -> list[str]:
    """`ctr run` arguments: --rootfs is a boolean flag, the rootfs dir takes the image's place after the flags."""
    return ["run", "--runc-binary", str(clave), option, "--rootfs", str(rootfs), container_id, *command]


def _task_row(containerd: Containerd, container_id: str) -> tuple[int, str] | None:
    """(pid, status) of a task from `ctr task ls`, or None when there is no such task."""
    for line in containerd.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1]), fields[2]
    return None


def _pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _assert_nothing_left(containerd: Containerd, container_id: str, init_pid: int | None = None) -> None:
    """No task, container, runtime state, cgroup, shim or container process remains for ``container_id``."""
    assert container_id not in containerd.task_ids()
    assert container_id not in containerd.container_ids()
    assert not (containerd.runc_root / container_id).exists(), "clave state left under the shim's runc root"
    assert not containerd.bundle_dir(container_id).exists(), "bundle left in containerd's state dir"
    assert containerd.cgroups(container_id) == []
    wait_for(lambda: not containerd.shims(container_id), "the shim to exit")
    if init_pid is not None:
        wait_for(lambda: _pid_gone(init_pid), f"container init {init_pid} to be gone")


def test_run_prints_output_and_returns_exit_status(containerd: Containerd, clave: Path, busybox_rootfs: Path) -> None:
    container_id = _new_id("out")
    result = containerd.ctr(*_run_args(clave, busybox_rootfs, "--rm", container_id, "sh", "-c",
                                       "echo hello from clave; echo to stderr >&2; exit 7"))
    assert result.stdout == "hello from clave\n", result.stderr
    assert "to stderr" in result.stderr
    assert result.returncode == 7
    _assert_nothing_left(containerd, container_id)


def test_container_sees_its_own_rootfs_and_pid_namespace(containerd: Containerd, clave: Path,
                                                         busybox_rootfs: Path) -> None:
    container_id = _new_id("ns")
    (busybox_rootfs / "etc" / "marker").write_text("inside the busybox rootfs\n")
    result = containerd.ctr(*_run_args(clave, busybox_rootfs, "--rm", container_id, "sh", "-c",
                                       "cat /etc/marker; echo pid=$$"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "inside the busybox rootfs\npid=1\n"
    _assert_nothing_left(containerd, container_id)


def test_shim_passes_runc_flags_and_clave_accepts_them(containerd: Containerd, clave: Path, busybox_rootfs: Path,
                                                       tmp_path: Path) -> None:
    # A recording wrapper: the shim needs one executable path, so this script logs argv and execs clave.
    calls = tmp_path / "calls.txt"
    wrapper = tmp_path / "clave-recorder"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do printf \'%s\\t\' "$a"; done >> {calls}\n'
                       f"echo >> {calls}\nexec {clave} \"$@\"\n")
    wrapper.chmod(0o755)
    container_id = _new_id("flags")
    result = containerd.ctr(*_run_args(wrapper, busybox_rootfs, "--rm", container_id, "true"))
    assert result.returncode == 0, result.stderr

    invocations = [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]
    bundle = containerd.bundle_dir(container_id)
    expected_globals = ["--root", str(containerd.runc_root), "--log", str(bundle / "log.json"),
                        "--log-format", "json"]
    verbs = []
    for argv in invocations:
        assert argv[:len(expected_globals)] == expected_globals, argv
        verbs.append(argv[len(expected_globals)])
    assert verbs[:2] == ["create", "start"], verbs
    assert verbs[-1] == "delete", verbs
    create = invocations[0]
    assert create[create.index("--bundle") + 1] == str(bundle)
    assert "--pid-file" in create and create[-1] == container_id
    _assert_nothing_left(containerd, container_id)


def test_runtime_error_reaches_ctr_through_log_json(containerd: Containerd, clave: Path,
                                                    busybox_rootfs: Path) -> None:
    container_id = _new_id("err")
    result = containerd.ctr(*_run_args(clave, busybox_rootfs, "--rm", container_id, "/no/such/binary"))
    assert result.returncode != 0
    # The shim quotes the last "level":"error" line of log.json; without one it says it could not retrieve it.
    assert "OCI runtime create failed" in result.stderr, result.stderr
    assert "/no/such/binary" in result.stderr, result.stderr
    assert "unable to retrieve OCI runtime error" not in result.stderr, result.stderr
    containerd.ctr("container", "delete", container_id)
    _assert_nothing_left(containerd, container_id)


def test_foreground_task_killed_with_sigkill(containerd: Containerd, clave: Path, busybox_rootfs: Path) -> None:
    container_id = _new_id("kill")
    command = ["ctr", "--address", containerd.address, "-n", containerd.namespace,
               *_run_args(clave, busybox_rootfs, "--rm", container_id, "sleep", "1000")]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (_task_row(containerd, container_id) or (0, ""))[1] == "RUNNING", "the task to run")
        row = _task_row(containerd, container_id)
        assert row is not None
        init_pid = row[0]
        assert not _pid_gone(init_pid)
        containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=True)
        _, stderr = runner.communicate(timeout=20)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 128 + 9, stderr
    _assert_nothing_left(containerd, container_id, init_pid)


def test_detached_task_listed_killed_and_deleted(containerd: Containerd, clave: Path, busybox_rootfs: Path) -> None:
    container_id = _new_id("det")
    containerd.ctr(*_run_args(clave, busybox_rootfs, "-d", container_id, "sleep", "1000"), check=True)
    row = _task_row(containerd, container_id)
    assert row is not None and row[1] == "RUNNING", row
    init_pid = row[0]
    assert not _pid_gone(init_pid)
    assert (containerd.runc_root / container_id).is_dir(), "clave keeps its state under the shim's --root"
    assert containerd.cgroups(container_id) != []

    # clave itself, pointed at the shim's root, agrees with containerd.
    state = subprocess.run([str(clave), "--root", str(containerd.runc_root), "state", container_id],
                           capture_output=True, text=True, check=True)
    assert '"status": "running"' in state.stdout and f'"pid": {init_pid}' in state.stdout, state.stdout

    containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=True)
    wait_for(lambda: (_task_row(containerd, container_id) or (0, ""))[1] == "STOPPED", "the task to stop")
    containerd.ctr("task", "delete", container_id, check=True)
    containerd.ctr("container", "delete", container_id, check=True)
    _assert_nothing_left(containerd, container_id, init_pid)


def test_kill_after_exit_reports_process_already_finished(containerd: Containerd, clave: Path,
                                                          busybox_rootfs: Path) -> None:
    container_id = _new_id("late")
    containerd.ctr(*_run_args(clave, busybox_rootfs, "-d", container_id, "/bin/true"), check=True)
    try:
        wait_for(lambda: (_task_row(containerd, container_id) or (0, ""))[1] == "STOPPED", "the task to exit")
        result = containerd.ctr("task", "kill", "-s", "SIGKILL", container_id)
        assert result.returncode != 0
        assert "process already finished: not found" in result.stderr, result.stderr
    finally:
        containerd.ctr("task", "delete", container_id)
        containerd.ctr("container", "delete", container_id)
    _assert_nothing_left(containerd, container_id)


def test_namespace_runc_root_is_empty_after_all_tests(containerd: Containerd) -> None:
    # Runs last in this module: every container above was removed, so clave left no state behind at all.
    leftovers = sorted(os.listdir(containerd.runc_root)) if containerd.runc_root.exists() else []
    assert leftovers == []
