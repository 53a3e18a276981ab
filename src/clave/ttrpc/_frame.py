"""ttrpc framing: a 10-byte big-endian header (length, stream id, type, flags) before each message."""

from __future__ import annotations

import _socket
import struct

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = 10
MAX_MESSAGE = 4 << 20
# The protocol reserves the top byte of the length: anything this large means the stream lost sync.
MAX_SANE_LENGTH = 1 << 24

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


class ConnectionClosed(Exception):
    """The peer closed the connection (possibly mid-frame)."""


def recv_exact(sock: _socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise ConnectionClosed."""
    if n == 0:
        return b""
    data = sock.recv(n)
    if len(data) == n:
        return data
    if not data:
        raise ConnectionClosed("connection closed")
    buf = bytearray(data)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed("connection closed in the middle of a frame")
        buf += chunk
    return bytes(buf)


def discard(sock: _socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (the body of an oversized frame), keeping the stream in sync."""
    while n > 0:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise ConnectionClosed("connection closed in the middle of a frame")
        n -= len(chunk)


def pack_header(length: int, stream_id: int, msg_type: int, flags: int) -> bytes:
    return HEADER.pack(length, stream_id, msg_type, flags)


def unix_address(address: str) -> str:
    """The socket address of a ttrpc endpoint: ``unix://`` prefix dropped, ``@name`` or ``\\0name`` abstract."""
    if address.startswith("unix://"):
        address = address[len("unix://") :]
    if address.startswith("@"):
        return "\0" + address[1:]
    return address
