"""ttrpc client and server over real unix sockets."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clave.proto.generated import containerd_task_v2 as task
from clave.proto.generated import google_protobuf
from clave.proto.generated.ttrpc import KeyValue, Request, Response
from clave.ttrpc import MAX_MESSAGE, Client, Code, Context, Server, ServerStream, TtrpcError, typed

SVC = "test.Service"


def echo(ctx: Context, data: bytes) -> bytes:
    return data


def metadata(ctx: Context, data: bytes) -> bytes:
    pairs = [KeyValue(key=k, value=v) for k, values in sorted(ctx.metadata.items()) for v in values]
    return Request(metadata=pairs).encode()


def sleep(ctx: Context, data: bytes) -> bytes:
    time.sleep(float(data.decode()))
    return b"slept"


def remaining(ctx: Context, data: bytes) -> bytes:
    left = ctx.time_remaining()
    return b"none" if left is None else f"{left:.3f}".encode()


def not_found(ctx: Context, data: bytes) -> bytes:
    raise TtrpcError(Code.NOT_FOUND, "container c1 not found")


def crash(ctx: Context, data: bytes) -> bytes:
    raise RuntimeError("boom")


def huge(ctx: Context, data: bytes) -> bytes:
    return bytes(MAX_MESSAGE + 1)


def count(ctx: Context, stream: ServerStream) -> bytes | None:
    first = stream.recv()
    assert first is not None
    for i in range(int(first.decode())):
        stream.send(str(i).encode())
    return None


def total(ctx: Context, stream: ServerStream) -> bytes | None:
    result = 0
    while (item := stream.recv(timeout=5)) is not None:
        result += int(item.decode())
    return str(result).encode()


def chat(ctx: Context, stream: ServerStream) -> bytes | None:
    while (item := stream.recv(timeout=5)) is not None:
        stream.send(item.upper())
    return None


class Shim:
    """A partial containerd.task.v2.Task implementation for register_service."""

    def state(self, ctx: Context, request: task.StateRequest) -> task.StateResponse:
        if request.id != "c1":
            raise TtrpcError(Code.NOT_FOUND, f"container {request.id} not found")
        return task.StateResponse(id=request.id, pid=42, status=2, exec_id=request.exec_id)

    def resize_pty(self, ctx: Context, request: task.ResizePtyRequest) -> google_protobuf.Empty:
        return google_protobuf.Empty()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.register(
        SVC,
        {
            "Echo": echo,
            "Metadata": metadata,
            "Sleep": sleep,
            "Remaining": remaining,
            "NotFound": not_found,
            "Crash": crash,
            "Huge": huge,
        },
    )
    srv.register_stream(SVC, "Count", count)
    srv.register_stream(SVC, "Total", total)
    srv.register_stream(SVC, "Chat", chat)
    srv.register_service(task.TaskService, Shim())
    yield srv
    srv.close()


@pytest.fixture
def address(server: Server, tmp_path: Path) -> str:
    path = tmp_path / "ttrpc.sock"
    server.start(server.listen(f"unix://{path}"))
    return str(path)


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with Client.connect(address) as c:
        yield c


def raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(address)
    return sock


def raw_send(sock: socket.socket, stream_id: int, msg_type: int, flags: int, payload: bytes) -> None:
    sock.sendall(struct.pack(">IIBB", len(payload), stream_id, msg_type, flags) + payload)


def raw_recv(sock: socket.socket) -> tuple[int, int, int, bytes]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "connection closed"
            buf += chunk
        return buf

    length, stream_id, msg_type, flags = struct.unpack(">IIBB", exact(10))
    return stream_id, msg_type, flags, exact(length)


def test_unary_call(client: Client) -> None:
    assert client.call(SVC, "Echo", b"hello", timeout=5) == b"hello"
    assert client.call(SVC, "Echo", b"", timeout=5) == b""


def test_metadata_reaches_the_handler(client: Client) -> None:
    reply = client.call(SVC, "Metadata", metadata={"X-Trace": "abc", "multi": ["1", "2"]}, timeout=5)
    pairs = [(kv.key, kv.value) for kv in Request.decode(reply).metadata]
    assert pairs == [("multi", "1"), ("multi", "2"), ("x-trace", "abc")]


def test_errors_carry_status_codes(client: Client) -> None:
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "NotFound", timeout=5)
    assert err.value.code == Code.NOT_FOUND and err.value.message == "container c1 not found"
    assert str(err.value) == "NotFound: container c1 not found"
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Crash", timeout=5)
    assert err.value.code == Code.INTERNAL and "RuntimeError: boom" in err.value.message
    with pytest.raises(TtrpcError) as err:
        client.call("no.Such", "Thing", timeout=5)
    assert err.value.code == Code.UNIMPLEMENTED
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Nothing", timeout=5)
    assert err.value.code == Code.UNIMPLEMENTED
    assert client.call(SVC, "Echo", b"still fine", timeout=5) == b"still fine"


def test_typed_service(client: Client) -> None:
    reply = client.invoke(task.TaskService.NAME, "State", task.StateRequest(id="c1", exec_id="e"), task.StateResponse)
    assert reply == task.StateResponse(id="c1", pid=42, status=2, exec_id="e")
    with pytest.raises(TtrpcError) as err:
        client.invoke(task.TaskService.NAME, "State", task.StateRequest(id="zz"), task.StateResponse)
    assert err.value.code == Code.NOT_FOUND
    client.invoke(task.TaskService.NAME, "ResizePty", task.ResizePtyRequest(id="c1", width=80), google_protobuf.Empty)
    with pytest.raises(TtrpcError) as err:  # not implemented by Shim
        client.invoke(task.TaskService.NAME, "Pause", task.PauseRequest(id="c1"), google_protobuf.Empty)
    assert err.value.code == Code.UNIMPLEMENTED
    with pytest.raises(TtrpcError) as err:  # undecodable request
        client.call(task.TaskService.NAME, "State", b"\n\x09short", timeout=5)
    assert err.value.code == Code.INVALID_ARGUMENT


def test_typed_decorator() -> None:
    handler = typed(task.StartRequest)(lambda ctx, req: task.StartResponse(pid=len(req.id)))
    ctx = Context("s", "m", {}, None, 1)
    assert handler(ctx, task.StartRequest(id="abc").encode()) == task.StartResponse(pid=3).encode()


def test_deadlines(client: Client) -> None:
    left = float(client.call(SVC, "Remaining", timeout=2.0))
    assert 1.0 < left <= 2.0
    assert client.call(SVC, "Remaining") == b"none"
    started = time.monotonic()
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Sleep", b"0.5", timeout=0.1)
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.4
    time.sleep(0.5)  # the late response arrives and is dropped
    assert client.call(SVC, "Echo", b"after", timeout=5) == b"after"


def test_server_refuses_a_request_whose_deadline_passed(server: Server, address: str) -> None:
    sock = raw_connect(address)
    # occupy nothing; a 1 ns deadline has passed by the time the handler would start
    raw_send(sock, 1, 1, 0, Request(service=SVC, method="Sleep", payload=b"0.2", timeout_nano=1).encode())
    stream_id, msg_type, _, payload = raw_recv(sock)
    status = Response.decode(payload).status
    assert (stream_id, msg_type) == (1, 2)
    assert status is not None and status.code == Code.DEADLINE_EXCEEDED
    sock.close()


def test_concurrent_calls_share_one_connection(client: Client) -> None:
    results: list[bytes] = []
    started = time.monotonic()
    def call() -> None:
        results.append(client.call(SVC, "Sleep", b"0.3", timeout=5))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"slept"] * 8
    assert time.monotonic() - started < 1.5  # run in parallel, not one after another


def test_oversize_messages(client: Client, address: str) -> None:
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Echo", bytes(MAX_MESSAGE), timeout=5)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Huge", timeout=5)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    # a peer that sends an oversized frame anyway gets an error on that stream and the connection keeps working
    sock = raw_connect(address)
    raw_send(sock, 1, 1, 0, bytes(MAX_MESSAGE + 10))
    stream_id, _, _, payload = raw_recv(sock)
    status = Response.decode(payload).status
    assert stream_id == 1 and status is not None and status.code == Code.RESOURCE_EXHAUSTED
    raw_send(sock, 3, 1, 0, Request(service=SVC, method="Echo", payload=b"ok").encode())
    assert Response.decode(raw_recv(sock)[3]).payload == b"ok"
    sock.close()
    assert client.call(SVC, "Echo", b"x", timeout=5) == b"x"


def test_malformed_frames_fail_cleanly_and_the_server_keeps_serving(client: Client, address: str) -> None:
    sock = raw_connect(address)
    raw_send(sock, 1, 1, 0, b"\xff\xff\xff")  # not a Request
    stream_id, msg_type, _, payload = raw_recv(sock)
    status = Response.decode(payload).status
    assert (stream_id, msg_type) == (1, 2) and status is not None and status.code == Code.INVALID_ARGUMENT
    raw_send(sock, 2, 1, 0, Request(service=SVC, method="Echo").encode())  # even stream id
    status = Response.decode(raw_recv(sock)[3]).status
    assert status is not None and status.code == Code.INVALID_ARGUMENT
    raw_send(sock, 1, 1, 0, Request(service=SVC, method="Echo").encode())  # reused stream id
    status = Response.decode(raw_recv(sock)[3]).status
    assert status is not None and status.code == Code.INVALID_ARGUMENT
    raw_send(sock, 99, 3, 0, b"data for nobody")  # ignored
    raw_send(sock, 5, 7, 0, b"unknown type")  # ignored
    raw_send(sock, 7, 1, 0, Request(service=SVC, method="Echo", payload=b"alive").encode())
    assert Response.decode(raw_recv(sock)[3]).payload == b"alive"
    # a header that cannot be ttrpc (length above 16 MiB) ends that connection only
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    try:
        assert sock.recv(10) == b""
    except ConnectionResetError:
        pass  # closed with our unread bytes still queued
    sock.close()
    assert client.call(SVC, "Echo", b"others unaffected", timeout=5) == b"others unaffected"
    # and a peer that vanishes mid-frame does not disturb the server either
    sock = raw_connect(address)
    sock.sendall(struct.pack(">IIBB", 100, 1, 1, 0) + b"partial")
    sock.close()
    with Client.connect(address) as second:
        assert second.call(SVC, "Echo", b"new client", timeout=5) == b"new client"


def test_server_streaming(client: Client) -> None:
    stream = client.stream(SVC, "Count", b"5", client_streams=False, timeout=5)
    assert list(stream) == [b"0", b"1", b"2", b"3", b"4"]
    assert stream.recv() is None


def test_client_streaming(client: Client) -> None:
    stream = client.stream(SVC, "Total", client_streams=True, timeout=5)
    for n in (1, 2, 3, 4):
        stream.send(str(n).encode())
    assert stream.finish() == b"10"


def test_bidirectional_streaming(client: Client) -> None:
    stream = client.stream(SVC, "Chat", client_streams=True, timeout=5)
    stream.send(b"one")
    assert stream.recv() == b"ONE"
    stream.send(b"two")
    assert stream.recv() == b"TWO"
    stream.close_send()
    assert stream.recv() is None
    with pytest.raises(TtrpcError):
        stream.send(b"closed")


def test_stream_errors_reach_the_client(client: Client) -> None:
    stream = client.stream(SVC, "Count", b"not a number", client_streams=False, timeout=5)
    with pytest.raises(TtrpcError) as err:
        stream.recv()
    assert err.value.code == Code.INTERNAL


def test_abstract_socket_address(server: Server) -> None:
    name = f"@clave-ttrpc-test-{os.getpid()}-{time.monotonic_ns()}"
    server.start(server.listen(name))
    with Client.connect(name) as c:
        assert c.call(SVC, "Echo", b"abstract", timeout=5) == b"abstract"
    with Client.connect("unix://\0" + name[1:]) as c:
        assert c.call(SVC, "Echo", b"nul form", timeout=5) == b"nul form"


def test_listen_refuses_an_existing_path(server: Server, address: str) -> None:
    with pytest.raises(OSError):
        server.listen(address)
    assert oct(os.stat(address).st_mode & 0o777) == "0o600"


def test_closed_server_fails_pending_and_new_calls(server: Server, address: str) -> None:
    client = Client.connect(address)
    errors: list[TtrpcError] = []

    def slow() -> None:
        try:
            client.call(SVC, "Sleep", b"2", timeout=5)
        except TtrpcError as e:
            errors.append(e)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.2)
    server.close()
    t.join(timeout=5)
    assert [e.code for e in errors] == [Code.UNAVAILABLE]
    with pytest.raises(TtrpcError) as err:
        client.call(SVC, "Echo", timeout=1)
    assert err.value.code == Code.UNAVAILABLE
    client.close()
    with pytest.raises(TtrpcError) as err:
        Client.connect(address, timeout=1)
    assert err.value.code == Code.UNAVAILABLE


def test_many_sequential_calls_are_fast(client: Client) -> None:
    payload = task.StateRequest(id="c1").encode()
    started = time.perf_counter()
    for _ in range(200):
        client.call(task.TaskService.NAME, "State", payload, timeout=5)
    per_call = (time.perf_counter() - started) / 200
    assert per_call < 0.005, f"{per_call * 1e6:.0f} us per round trip"


def test_require_same_user_refuses_other_users() -> None:
    server = Server(require_same_user=True)
    server.register(SVC, {"Echo": echo})
    name = f"@clave-ttrpc-peer-{os.getpid()}-{time.monotonic_ns()}"
    server.start(server.listen(name))
    try:
        with Client.connect(name) as c:
            assert c.call(SVC, "Echo", b"same user", timeout=5) == b"same user"
        probe = (
            "import sys; from clave.ttrpc import Client, TtrpcError\n"
            "try:\n"
            f"    Client.connect({name!r}).call({SVC!r}, 'Echo', b'x', timeout=5)\n"
            "except TtrpcError as e:\n"
            "    print(e)\n"
            "    sys.exit(e.code)\n"
        )
        src = str(Path(__file__).resolve().parents[2] / "src")
        env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}
        try:
            result = subprocess.run([sys.executable, "-c", probe], user=65534, env=env, capture_output=True, timeout=20)
        except PermissionError:
            pytest.skip("cannot switch to uid 65534 here")
        if result.returncode not in (0, Code.UNAVAILABLE):
            pytest.skip(f"the probe cannot run as uid 65534: {result.stderr.decode()[-200:]}")
        # connected (abstract sockets have no permissions), then dropped before any response
        assert result.returncode == Code.UNAVAILABLE
        assert "cannot connect" not in result.stdout.decode()
    finally:
        server.close()
