"""process.terminal: the pty master handed over --console-socket (runc's SCM_RIGHTS protocol)."""

from __future__ import annotations

import array
import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Bundle, Clave, reap


@pytest.fixture
def console_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    yield path, listener
    listener.close()


def receive_master(listener: socket.socket) -> tuple[int, str]:
    """What a caller does: accept, read the one message and its SCM_RIGHTS fd."""
    conn, _ = listener.accept()
    with conn:
        fds = array.array("i")
        data, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: fds.itemsize])
    assert len(fds) == 1, "no fd in the console socket message"
    return fds[0], data.decode()


def read_until_eof(master: int, timeout: float = 10, stop_at: bytes | None = None) -> str:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop_at and stop_at in out):
        try:
            chunk = os.read(master, 4096)
        except OSError as exc:
            if exc.errno == errno.EIO:  # the slave side is closed: the process exited
                break
            raise
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def test_console_socket_receives_pty_master(clave: Clave, bundle: Bundle,
                                            console_socket: tuple[str, socket.socket]) -> None:
    path, listener = console_socket
    bundle.process["terminal"] = True
    bundle.process["consoleSize"] = {"height": 33, "width": 101}
    bundle.sh("tty; stty size; echo ready; read line; echo got:$line")
    cid = clave.id()
    pid = clave.create(cid, "--console-socket", path)
    master, name = receive_master(listener)
    try:
        assert name.startswith("/dev/pts/")
        clave("start", cid)
        out = read_until_eof(master, stop_at=b"ready\r\n")
        os.write(master, b"typed\n")  # only now: the tty would echo it among the earlier lines
        out += read_until_eof(master)
    finally:
        os.close(master)
    lines = out.replace("\r", "").splitlines()
    assert lines[0] == name  # `tty` names the same pty the socket message did
    assert lines[1:3] == ["33 101", "ready"]
    assert "got:typed" in lines
    status = reap(pid)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    assert clave.stdout(cid) == "" and clave.stderr(cid) == ""  # nothing went to create's stdio
    clave("delete", cid)


def test_unreachable_console_socket(clave: Clave, bundle: Bundle, tmp_path: Path, assert_clean: object) -> None:
    bundle.process["terminal"] = True
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), "--console-socket", str(tmp_path / "nope"),
                         clave.id())
    assert "console socket" in message
    assert_clean()  # type: ignore[operator]


def test_run_allocates_console(clave: Clave, bundle: Bundle) -> None:
    bundle.process["terminal"] = True
    bundle.sh("tty; echo done")
    out = clave.output(input=b"").replace("\r", "")
    assert out.startswith("/dev/pts/") and out.rstrip().endswith("done")
