"""ttrpc framing: a 10-byte big-endian header (length, stream id, type, flags) before each message."""

from __future__ import annotations

import os
import select
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Channel(Protocol):
        """What a ttrpc connection reads and writes: a unix socket, or an FdChannel over a byte device."""

        def recv(self, n: int, /) -> bytes: ...
        def sendall(self, data: bytes, /) -> None: ...
        def shutdown(self, how: int, /) -> None: ...
        def close(self) -> None: ...

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


class FdChannel:
    """A ttrpc connection over an already-open file descriptor that is not a socket: a character device such
    as a virtio-serial port (/dev/vportNp1, the guest end of the agent channel) or a pipe pair.

    End of file (the host closed its side of the port) ends the connection; the fd stays open unless
    ``owns_fd``, so the caller can serve the next connection on the same device.

    A non-blocking fd is waited on with poll(), and POLLHUP ends the connection in both directions. That
    matters for a virtio-serial port: a blocking write while the host is away waits for the *next* host and
    then delivers the rest of a frame meant for the previous one, breaking the new connection's framing."""

    def __init__(self, fd: int, owns_fd: bool = False) -> None:
        self.fd = fd
        self._owns_fd = owns_fd
        self._shut = False

    def _wait(self, events: int) -> bool:
        """Wait until ``events`` or a hang-up; False on a hang-up without ``events``."""
        poller = select.poll()
        poller.register(self.fd, events)
        while not self._shut:
            for _fd, revents in poller.poll(500):  # a timeout, so shutdown() is noticed
                if revents & events:
                    return True
                if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return False
        return False

    def recv(self, n: int, /) -> bytes:
        while not self._shut:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                if not self._wait(select.POLLIN):
                    return b""
        return b""

    def sendall(self, data: bytes, /) -> None:
        view = memoryview(data)
        while view:
            if self._shut:
                raise BrokenPipeError("channel shut down")
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                if not self._wait(select.POLLOUT):
                    raise BrokenPipeError("peer hung up") from None

    def shutdown(self, how: int, /) -> None:
        self._shut = True

    def close(self) -> None:
        self._shut = True
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def recv_exact(sock: Channel, n: int) -> bytes:
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


def discard(sock: Channel, n: int) -> None:
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
