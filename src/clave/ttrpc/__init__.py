"""ttrpc, containerd's lightweight RPC over unix sockets: framing, client, server, streams and status codes.

One implementation shared by the containerd shim and the VM agent (which serves a virtio-serial port with
``Server.serve_fd``; the host reaches it through QEMU's chardev socket with ``Client.connect``). Payloads
are protobuf bytes; the message classes are in ``clave.proto.generated``.

    server = Server()
    server.register("example.Echo", {"Say": lambda ctx, data: data})
    server.start(server.listen("unix:///run/example.sock"))
    with Client.connect("unix:///run/example.sock") as client:
        client.call("example.Echo", "Say", b"hi", timeout=1.0)
"""

from __future__ import annotations

from clave.ttrpc._frame import MAX_MESSAGE, FdChannel, unix_address
from clave.ttrpc.client import Client, ClientStream
from clave.ttrpc.errors import Code, TtrpcError, from_clave_error, to_clave_error
from clave.ttrpc.server import Context, Server, ServerStream, typed

__all__ = [
    "from_clave_error",
    "to_clave_error",
    "MAX_MESSAGE",
    "Client",
    "ClientStream",
    "Code",
    "Context",
    "FdChannel",
    "Server",
    "ServerStream",
    "TtrpcError",
    "typed",
    "unix_address",
]
