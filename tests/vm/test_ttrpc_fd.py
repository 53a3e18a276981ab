"""ttrpc's Server.serve_fd: one connection served on an already-open fd that is not a listening socket."""

from __future__ import annotations

import socket
import threading

from clave.ttrpc import Client, Server


def test_serve_fd_answers_and_returns_at_end_of_file() -> None:
    ours, theirs = socket.socketpair()
    server = Server()
    server.register("test.Echo", {"Say": lambda ctx, data: data[::-1]})
    done = threading.Event()

    def serve() -> None:
        server.serve_fd(theirs.fileno())
        done.set()

    threading.Thread(target=serve, daemon=True).start()
    client = Client(ours)
    assert client.call("test.Echo", "Say", b"abc", timeout=5) == b"cba"
    client.close()
    assert done.wait(5)
    theirs.fileno()  # the fd is still ours to serve again or close
    theirs.close()


def test_a_non_blocking_fd_is_polled_and_a_hang_up_ends_the_connection() -> None:
    import os

    ours, theirs = socket.socketpair()
    os.set_blocking(theirs.fileno(), False)
    server = Server()
    server.register("test.Echo", {"Say": lambda ctx, data: data * 100_000})  # larger than the socket buffer
    done = threading.Event()
    threading.Thread(target=lambda: (server.serve_fd(theirs.fileno()), done.set()), daemon=True).start()
    client = Client(ours)
    assert client.call("test.Echo", "Say", b"ab", timeout=5) == b"ab" * 100_000
    client.close()
    assert done.wait(5)
    theirs.close()


def test_stream_id_one_again_is_a_new_client_on_a_device_channel() -> None:
    """A virtio-serial port cannot show a quick disconnect and reconnect: the new client's first request
    (stream id 1 again) starts a new connection instead of failing as a reused id."""
    from clave.proto.generated.ttrpc import Request, Response
    from clave.ttrpc._frame import HEADER, TYPE_REQUEST, pack_header, recv_exact

    ours, theirs = socket.socketpair()
    server = Server()
    server.register("test.Echo", {"Say": lambda ctx, data: data})
    threading.Thread(target=server.serve_fd, args=(theirs.fileno(),), daemon=True).start()

    def call(stream_id: int, text: bytes) -> tuple[int, Response]:
        payload = Request(service="test.Echo", method="Say", payload=text).encode()
        ours.sendall(pack_header(len(payload), stream_id, TYPE_REQUEST, 0) + payload)
        length, sid, _type, _flags = HEADER.unpack(recv_exact(ours, 10))
        return sid, Response.decode(recv_exact(ours, length))

    for stream_id, text in ((1, b"a"), (3, b"b"), (1, b"new client"), (3, b"c")):
        sid, response = call(stream_id, text)
        assert sid == stream_id
        assert (response.status is None or response.status.code == 0) and response.payload == text
    ours.close()
    theirs.close()
