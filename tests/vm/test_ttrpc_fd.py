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
