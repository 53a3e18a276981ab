"""runtime-spec runtime.md: create / start / state / kill / delete, the state JSON and the operations'
preconditions; create's handling of stdio, the pid file, --preserve-fds and LISTEN_FDS; run's exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import CLAVE, Bundle, Clave, reap

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def wait_for(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


from helpers import alive  # noqa: E402


def test_create_waits_start_runs(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("echo ran > /out/marker; exec sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    assert alive(pid)
    state = clave.state(cid)
    assert state["status"] == "created" and state["pid"] == pid
    time.sleep(0.2)
    assert not (bundle.out / "marker").exists(), "the user process ran before start"
    clave("start", cid)
    assert wait_for(bundle.out / "marker") == "ran\n"
    assert clave.state(cid)["status"] == "running"
    clave("kill", cid, "KILL")
    status = reap(pid)
    assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    stopped = clave.state(cid)
    assert stopped["status"] == "stopped" and stopped["pid"] == 0
    clave("delete", cid)
    assert not (clave.root / cid).exists()
    clave.fail("state", cid)


def test_state_json_fields(clave: Clave, bundle: Bundle) -> None:
    bundle.config["annotations"] = {"org.example.key": "value"}
    bundle.args("sleep", "60")
    cid = clave.id()
    before = time.time()
    pid = clave.create(cid)
    state = clave.state(cid)
    assert set(state) >= {"ociVersion", "id", "status", "pid", "bundle", "rootfs", "created", "owner", "annotations"}
    assert state["ociVersion"] == bundle.config["ociVersion"]
    assert state["id"] == cid
    assert state["pid"] == pid
    assert state["bundle"] == str(bundle.path)
    assert state["rootfs"] == str(bundle.rootfs)
    assert state["annotations"] == {"org.example.key": "value"}
    assert RFC3339.match(state["created"]), state["created"]
    created = time.mktime(time.strptime(state["created"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 2 <= created <= time.time() + 2
    assert state["owner"] == ""


def test_pid_file_has_no_newline(clave: Clave, bundle: Bundle) -> None:
    bundle.args("sleep", "60")
    pid = clave.create(clave.id())
    raw = (bundle.path / f"{clave.id()}.pid").read_bytes()
    assert raw == str(pid).encode()


def test_wrong_state_operations_fail_without_effect(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("echo started >> /out/log; exec sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    wait_for(bundle.out / "log")
    assert "running" in clave.fail("start", cid)
    assert "not stopped" in clave.fail("delete", cid)
    assert clave.state(cid)["status"] == "running" and alive(pid)
    time.sleep(0.1)
    assert (bundle.out / "log").read_text() == "started\n", "a second start ran the process again"
    clave("kill", cid, "9")
    reap(pid)
    assert clave.state(cid)["status"] == "stopped"
    assert "stopped" in clave.fail("start", cid)
    assert "not running" in clave.fail("kill", cid, "KILL")
    assert clave.state(cid)["status"] == "stopped"
    clave("delete", cid)


def test_delete_created_needs_no_force_and_kills_init(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    bundle.sh("echo ran > /out/marker")
    cid = clave.id()
    pid = clave.create(cid)
    clave("delete", cid)  # runc deletes a created container without --force
    reap(pid)
    assert not alive(pid)
    assert not (bundle.out / "marker").exists()
    assert_clean()  # type: ignore[operator]


def test_delete_force_running(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    bundle.sh("sleep 60 & sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    clave("delete", "--force", cid)
    reap(pid)
    assert_clean()  # type: ignore[operator]


def test_delete_stopped_removes_everything(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    bundle.args("true")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    status = reap(pid)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    clave("delete", cid)
    assert_clean()  # type: ignore[operator]


def test_unknown_container(clave: Clave) -> None:
    for verb in (("start",), ("state",), ("kill",), ("delete",)):
        assert "does not exist" in clave.fail(*verb, clave.id("missing"))
    clave("delete", "--force", clave.id("missing"))  # runc: not an error with --force


def test_create_passes_stdio_untouched(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    bundle.sh("read line; echo \"out:$line\"; echo \"err:$line\" >&2")
    bundle.write()
    cid = clave.id()
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    pid_file = bundle.path / "pid"
    subprocess.run(
        [CLAVE, "--root", str(clave.root), "create", "--bundle", str(bundle.path), "--pid-file", str(pid_file), cid],
        stdin=stdin_r, stdout=stdout_w, stderr=stderr_w, check=True, timeout=30,
    )
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    pid = int(pid_file.read_text())
    clave.inits.append(pid)
    clave("start", cid)
    os.write(stdin_w, b"hello\n")
    os.close(stdin_w)
    with os.fdopen(stdout_r, "rb") as out, os.fdopen(stderr_r, "rb") as err:
        assert out.read() == b"out:hello\n"
        assert err.read() == b"err:hello\n"
    status = reap(pid)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    clave("delete", cid)


def test_preserve_fds_and_listen_fds(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    bundle.sh('echo "$LISTEN_FDS $LISTEN_PID"; echo via3 >&3; echo via4 >&4; if echo x 2>/dev/null >&5; '
              'then echo fd5-leaked; fi')
    bundle.write()
    three, four, five = (tmp_path / "fd3", tmp_path / "fd4", tmp_path / "fd5")
    wrapper = f'exec 3>"{three}" 4>"{four}" 5>"{five}"; exec "$@"'
    env = dict(os.environ, LISTEN_FDS="1")
    result = subprocess.run(
        ["sh", "-c", wrapper, "sh", CLAVE, "--root", str(clave.root), "run", "--bundle", str(bundle.path),
         "--preserve-fds", "1", clave.id()],
        capture_output=True, env=env, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"1 1\n"
    assert three.read_text() == "via3\n"
    assert four.read_text() == "via4\n"
    assert five.read_text() == ""


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3), ("exit 255", 255)])
def test_run_exit_status(clave: Clave, bundle: Bundle, script: str, code: int) -> None:
    bundle.sh(script)
    assert clave.run().returncode == code


def test_run_killed_by_signal_exits_128_plus(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("echo up > /out/up; exec sleep 60")
    bundle.write()
    cid = clave.id()
    proc = subprocess.Popen([CLAVE, "--root", str(clave.root), "run", "--bundle", str(bundle.path), cid],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(bundle.out / "up")
    clave("kill", cid, "SIGKILL")
    assert proc.wait(timeout=10) == 128 + 9
    assert not (clave.root / cid).exists(), "run did not delete the container"


@pytest.mark.parametrize("sig", ["9", "KILL", "SIGKILL", "sigkill"])
def test_kill_signal_forms(clave: Clave, bundle: Bundle, sig: str) -> None:
    bundle.args("sleep", "60")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    clave("kill", cid, sig)
    status = reap(pid)
    assert status is not None and os.WTERMSIG(status) == signal.SIGKILL
    clave("delete", cid)


def test_kill_default_sigterm_and_trap(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("trap 'echo usr1 >> /out/sig' USR1; trap 'echo term >> /out/sig; exit 7' TERM; "
              "echo ready > /out/ready; while true; do sleep 0.02; done")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    wait_for(bundle.out / "ready")
    clave("kill", cid, "USR1")
    assert wait_for(bundle.out / "sig") == "usr1\n"
    clave("kill", cid)
    status = reap(pid)
    assert status is not None and os.waitstatus_to_exitcode(status) == 7
    assert (bundle.out / "sig").read_text() == "usr1\nterm\n"
    clave("delete", cid)


def test_kill_unknown_signal(clave: Clave, bundle: Bundle) -> None:
    bundle.args("sleep", "60")
    cid = clave.id()
    pid = clave.create(cid)
    for bad in ("SIGNOPE", "0x9", "999"):
        assert "signal" in clave.fail("kill", cid, bad)
    assert clave.state(cid)["status"] == "created" and alive(pid)


def test_kill_all(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("sleep 60 & sleep 60 & echo up > /out/up; wait")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    wait_for(bundle.out / "up")
    clave("kill", "--all", cid, "KILL")
    reap(pid)
    assert clave.state(cid)["status"] == "stopped"
    clave("delete", cid)


def test_run_detach(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("echo up > /out/up; exec sleep 60")
    cid = clave.id()
    pid_file = bundle.path / "pid"
    with open(bundle.path / "out.log", "wb") as log:
        result = clave.run("--detach", "--pid-file", str(pid_file), cid=cid, stdout=log, stderr=log)
    assert result.returncode == 0, result.stderr
    clave.inits.append(int(pid_file.read_text()))
    wait_for(bundle.out / "up")
    assert clave.state(cid)["status"] == "running"
    clave("delete", "--force", cid)


def test_init_reaped_by_caller(clave: Clave, bundle: Bundle) -> None:
    """create leaves the init for the caller: as a subreaper we get it as our child and read its status."""
    bundle.sh("exit 42")
    cid = clave.id()
    pid = clave.create(cid)
    assert int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    clave("start", cid)
    status = reap(pid)
    assert status is not None and os.waitstatus_to_exitcode(status) == 42
    clave("delete", cid)


def test_run_passes_stdin(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("cat; echo err >&2")
    result = clave.run(input=b"piped in\n")
    assert result.returncode == 0
    assert result.stdout == b"piped in\n" and result.stderr == b"err\n"


def test_foreground_run_forwards_signals(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("trap 'echo got-term; exit 9' TERM; echo up > /out/up; while true; do sleep 0.02; done")
    bundle.write()
    proc = subprocess.Popen([CLAVE, "--root", str(clave.root), "run", "--bundle", str(bundle.path), clave.id()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(bundle.out / "up")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 9 and out == b"got-term\n"


def test_no_descriptors_leak_into_container(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    bundle.args("ls", "/proc/self/fd")
    bundle.write()
    wrapper = f'exec 7<"{bundle.path / "config.json"}" 8>"{tmp_path / "eight"}"; exec "$@"'
    result = subprocess.run(["sh", "-c", wrapper, "sh", CLAVE, "--root", str(clave.root), "run", "--bundle",
                             str(bundle.path), clave.id()], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) <= {b"0", b"1", b"2", b"3"}  # 3: ls reading the directory


def test_exec_failure_at_start(clave: Clave, bundle: Bundle) -> None:
    rootfs = bundle.private_rootfs()
    (rootfs / "bin" / "tool").symlink_to("busybox")
    bundle.args("/bin/tool", "true")
    cid = clave.id()
    pid = clave.create(cid)
    (rootfs / "bin" / "tool").unlink()
    message = clave.fail("start", cid)
    assert "/bin/tool" in message, message
    reap(pid)
    assert clave.state(cid)["status"] == "stopped"
    clave("delete", cid)
