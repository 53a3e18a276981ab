"""A tiny message channel over a pair of pipes, for the runtime ↔ intermediate ↔ init handshake.

Messages are one JSON object per line. Pipes (not sockets) because they cost nothing to import and are
inherited across fork; all ends are close-on-exec, so the parent sees EOF once the init has exec'd.
"""

from __future__ import annotations

import os

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ChannelClosed(Exception):
    """The other side went away without saying anything more."""


class Channel:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buffer = b""

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        """(parent end, child end)."""
        child_to_parent = os.pipe()
        parent_to_child = os.pipe()
        return (
            cls(child_to_parent[0], parent_to_child[1]),
            cls(parent_to_child[0], child_to_parent[1]),
        )

    def send(self, kind: str, **fields: Any) -> None:
        data = fastjson.dumps({"t": kind, **fields}).encode() + b"\n"
        while data:
            written = os.write(self.write_fd, data)
            data = data[written:]

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise ChannelClosed()
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        msg: dict[str, Any] = fastjson.loads(line)
        return msg

    def unread(self) -> bytes:
        """What arrived after the last whole message (raw bytes a process wrote before it went away)."""
        return self._buffer

    def expect(self, kind: str) -> dict[str, Any]:
        msg = self.recv()
        if msg["t"] == "error":
            raise ChannelError(msg["msg"])
        if msg["t"] != kind:
            raise ChannelError(f"protocol error: expected {kind!r}, got {msg['t']!r}")
        return msg

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class ChannelError(Exception):
    """The other side reported a failure (its one-line message)."""
