"""containerd-shim-clave-v2 when things go wrong, under a real containerd of our own: containerd restarts while
a task runs, the shim is SIGKILLed, malformed ttrpc reaches the shim's socket; and the IO paths `ctr` offers
beyond plain fifos (file:// and binary:// log URIs, piped stdin)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (  # tests/interop is not a package: its conftest is top-level
    Containerd,
    _remove_cgroup_tree,
    _wait_until_answering,
    _write_config,
    cgroup_dirs,
    shim_pids,
    stop_pid,
    wait_for,
)

from clave.proto.generated.ttrpc import Request, Response
from clave.ttrpc import Code

RUNTIME = "io.containerd.clave.v2"
TTRPC_HEADER = ">IIBB"


class Daemon:
    """A containerd that can be stopped and started again on the same config, root and state."""

    def __init__(self, base: Path) -> None:
        self.config = _write_config(base)
        self.log_path = base / "containerd.log"
        self.instance = Containerd(str(base / "containerd.sock"), f"clave-rb-{uuid.uuid4().hex[:8]}",
                                   base / "state", self.log_path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _wait_until_answering(self.instance, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_pid(self.process.pid)
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package containerd)")
    instance = Daemon(Path(tmp_path_factory.mktemp("ctrd")))
    instance.start()
    try:
        yield instance
    finally:
        try:
            if instance.process is not None and instance.process.poll() is None:
                instance.instance.remove_everything()
        finally:
            instance.stop()
            for pid in shim_pids(instance.instance.namespace):
                stop_pid(pid)
            for leftover in cgroup_dirs(instance.instance.namespace):
                _remove_cgroup_tree(leftover)
            try:  # the engine's root for the namespace (empty once every container is gone)
                os.rmdir(f"/run/containerd/clave/{instance.instance.namespace}")
            except OSError:
                pass


@pytest.fixture
def containerd(daemon: Daemon) -> Containerd:
    return daemon.instance


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _run(containerd: Containerd, rootfs: Path, flags: list[str], cid: str, *command: str,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    args = ["ctr", "--address", containerd.address, "-n", containerd.namespace, "run", "--runtime", RUNTIME,
            *flags, "--rootfs", str(rootfs), cid, *command]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def _task(containerd: Containerd, cid: str) -> tuple[int, str] | None:
    """(pid, status) of a task as `ctr task ls` shows it, None if it is not listed."""
    for line in containerd.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1]), fields[2]
    return None


from helpers import alive as _alive  # noqa: E402


def _assert_gone(containerd: Containerd, cid: str, init_pid: int, socket_path: str) -> None:
    wait_for(lambda: not shim_pids(containerd.namespace, cid), "the shim to exit")
    wait_for(lambda: not _alive(init_pid), "the container's init to die")
    state = Path(f"/run/containerd/clave/{containerd.namespace}/{cid}")
    assert not state.exists(), f"engine state left: {state}"
    assert containerd.cgroups(cid) == [], "cgroup left"
    assert not os.path.exists(socket_path), f"shim socket left: {socket_path}"
    assert str(containerd.bundle_dir(cid)) not in Path("/proc/self/mountinfo").read_text(), "rootfs mount left"


def _shim_socket(containerd: Containerd, cid: str) -> str:
    address = (containerd.bundle_dir(cid) / "address").read_text().strip()
    return address.removeprefix("unix://")


def _start_sleeper(containerd: Containerd, rootfs: Path, prefix: str) -> tuple[str, int]:
    cid = _id(prefix)
    result = _run(containerd, rootfs, ["-d"], cid, "sleep", "300")
    assert result.returncode == 0, result.stderr
    task = _task(containerd, cid)
    assert task is not None and task[1] == "RUNNING", task
    return cid, task[0]


def _kill_and_remove(containerd: Containerd, cid: str) -> None:
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    wait_for(lambda: (_task(containerd, cid) or (0, ""))[1] == "STOPPED", "the task to stop")
    containerd.ctr("task", "delete", cid, check=True)
    containerd.ctr("container", "delete", cid, check=True)


# --- containerd restart and shim crash ------------------------------------------------------------------------


def test_containerd_restart_reconnects_to_the_running_shim(daemon: Daemon, busybox_rootfs: Path) -> None:
    containerd = daemon.instance
    cid, init_pid = _start_sleeper(containerd, busybox_rootfs, "restart")
    shims = containerd.shims(cid)
    socket_path = _shim_socket(containerd, cid)
    daemon.stop()
    assert containerd.shims(cid) == shims and _alive(init_pid), "the shim and task must outlive containerd"
    daemon.start()
    assert _task(containerd, cid) == (init_pid, "RUNNING")
    result = containerd.ctr("task", "exec", "--exec-id", "after-restart", cid, "echo", "still here")
    assert (result.returncode, result.stdout) == (0, "still here\n"), result.stderr
    _kill_and_remove(containerd, cid)
    _assert_gone(containerd, cid, init_pid, socket_path)


def test_shim_crash_is_cleaned_up_by_delete(containerd: Containerd, busybox_rootfs: Path) -> None:
    cid, init_pid = _start_sleeper(containerd, busybox_rootfs, "crash")
    (shim,) = containerd.shims(cid)
    socket_path = _shim_socket(containerd, cid)
    os.kill(shim, signal.SIGKILL)
    # containerd sees the connection drop and runs `containerd-shim-clave-v2 ... delete` in the bundle.
    wait_for(lambda: (_task(containerd, cid) or (0, "STOPPED"))[1] == "STOPPED", "containerd to notice")
    wait_for(lambda: not _alive(init_pid), "delete to kill the container's init")
    if _task(containerd, cid) is not None:
        containerd.ctr("task", "delete", cid, check=True)
    containerd.ctr("container", "rm", cid, check=True)
    assert cid not in containerd.container_ids()
    _assert_gone(containerd, cid, init_pid, socket_path)


# --- malformed ttrpc ------------------------------------------------------------------------------------------


def _frame(stream_id: int, msg_type: int, payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    import struct

    return struct.pack(TTRPC_HEADER, len(payload) if length is None else length, stream_id, msg_type, flags) + payload


def _read_response(sock: socket.socket) -> tuple[int, int, Response]:
    """(stream id, status code, response) of the next frame, which must be a response."""
    import struct

    header = _recv(sock, 10)
    length, stream_id, msg_type, _ = struct.unpack(TTRPC_HEADER, header)
    assert msg_type == 2, f"expected a response frame, got type {msg_type}"
    response = Response.decode(_recv(sock, length))
    return stream_id, response.status.code if response.status is not None else 0, response


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the shim closed the connection"
        data += chunk
    return data


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_malformed_ttrpc_gets_errors_and_the_shim_keeps_serving(containerd: Containerd,
                                                                busybox_rootfs: Path) -> None:
    cid, init_pid = _start_sleeper(containerd, busybox_rootfs, "garbage")
    path = _shim_socket(containerd, cid)
    state = Request(service="containerd.task.v2.Task", method="State")
    with _connect(path) as sock:
        # Not a protobuf Request at all.
        sock.sendall(_frame(1, 1, b"\xff\xff\xff\xff\xff\xff"))
        stream_id, code, response = _read_response(sock)
        assert (stream_id, code) == (1, Code.INVALID_ARGUMENT), response
        # A Request whose payload, a StateRequest, is cut short (field 1 says 16 bytes, 2 follow).
        truncated = Request(service=state.service, method=state.method, payload=b"\x0a\x10ab").encode()
        sock.sendall(_frame(3, 1, truncated))
        stream_id, code, response = _read_response(sock)
        assert (stream_id, code) == (3, Code.INVALID_ARGUMENT), response
        # A method the service does not have.
        sock.sendall(_frame(5, 1, Request(service=state.service, method="Teleport").encode()))
        stream_id, code, response = _read_response(sock)
        assert stream_id == 5 and code in (Code.UNIMPLEMENTED, Code.NOT_FOUND)
        # A frame over the 4 MiB limit: refused, and the connection stays in sync.
        big = (4 << 20) + 1
        sock.sendall(_frame(7, 1, b"\0" * big))
        stream_id, code, response = _read_response(sock)
        assert (stream_id, code) == (7, Code.RESOURCE_EXHAUSTED), response
        # And a well-formed call on the same connection still works.
        from clave.proto.generated.containerd_task_v2 import StateRequest, StateResponse

        sock.sendall(_frame(9, 1, Request(service=state.service, method="State", timeout_nano=5_000_000_000,
                                          payload=StateRequest(id=cid).encode()).encode()))
        stream_id, code, response = _read_response(sock)
        assert (stream_id, code) == (9, 0), response
        assert StateResponse.decode(response.payload).pid == init_pid
    with _connect(path) as sock:
        # A header no ttrpc peer sends (length with the reserved top byte set): the shim hangs up.
        sock.sendall(_frame(1, 1, b"", length=0x7F000000))
        assert sock.recv(16) == b""
    with _connect(path) as sock:
        # A frame cut off by the peer going away.
        sock.sendall(_frame(1, 1, b"\x0a\x05", length=100))
    with _connect(path) as sock:
        sock.sendall(os.urandom(4096))
    assert _task(containerd, cid) == (init_pid, "RUNNING")
    result = containerd.ctr("task", "exec", "--exec-id", "after-garbage", cid, "echo", "ok")
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
    _kill_and_remove(containerd, cid)
    _assert_gone(containerd, cid, init_pid, path)


# --- IO ------------------------------------------------------------------------------------------------------


def test_file_log_uri(containerd: Containerd, busybox_rootfs: Path, tmp_path: Path) -> None:
    log = tmp_path / "container.log"
    cid = _id("filelog")
    result = _run(containerd, busybox_rootfs, ["--rm", "--log-uri", f"file://{log}"], cid,
                  "sh", "-c", "echo to stdout; echo to stderr >&2")
    assert result.returncode == 0, result.stderr
    assert sorted(log.read_text().splitlines()) == ["to stderr", "to stdout"]


LOGGER = """#!/bin/sh
# containerd's logging-binary protocol: stdout on fd 3, stderr on fd 4, close fd 5 once ready.
# Close fd 5 before starting the copies, or they inherit it and the shim waits forever.
out="$1"
echo "$CONTAINER_NAMESPACE/$CONTAINER_ID" > "$out.ids"
exec 5>&-
cat <&3 > "$out.stdout" &
cat <&4 > "$out.stderr" &
wait
"""


def test_binary_log_uri(containerd: Containerd, busybox_rootfs: Path, tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text(LOGGER)
    logger.chmod(0o755)
    out = tmp_path / "captured"
    cid = _id("binlog")
    # binary:///path?key=value: the binary gets each query key (and its value, if any) as arguments.
    result = _run(containerd, busybox_rootfs, ["--rm", "--log-uri", f"binary://{logger}?{out}="], cid,
                  "sh", "-c", "echo to stdout; echo to stderr >&2")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: Path(f"{out}.ids").exists() and Path(f"{out}.stdout").read_text(), "the logger's output")
    assert Path(f"{out}.stdout").read_text() == "to stdout\n"
    assert Path(f"{out}.stderr").read_text() == "to stderr\n"
    assert Path(f"{out}.ids").read_text() == f"{containerd.namespace}/{cid}\n"


def test_piped_stdin(containerd: Containerd, busybox_rootfs: Path) -> None:
    cid = _id("stdin")
    result = _run(containerd, busybox_rootfs, ["--rm"], cid, "sh", "-c", "cat; echo done", input="line 1\nline 2\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line 1\nline 2\ndone\n"
