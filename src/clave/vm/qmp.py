"""A small QMP client (QEMU Machine Protocol: JSON lines on a unix socket).

The greeting is read, ``qmp_capabilities`` leaves negotiation mode, and then each command gets exactly one
``return`` or ``error`` reply; asynchronous events arriving in between are kept in ``events``.
"""

from __future__ import annotations

import json
import socket
import time

from clave.vm.errors import VmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class QmpError(VmError):
    """QEMU refused a command (its error class and description) or the monitor went away."""


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> Qmp:
        """Connect, retrying until ``timeout`` while QEMU has not bound the socket yet."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"QMP socket {path}: QEMU is not listening") from None
                time.sleep(0.005)
            except OSError as exc:
                sock.close()
                raise QmpError(f"QMP socket {path}: {exc}") from None

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except OSError as exc:
            raise QmpError(f"QMP: {exc}") from None
        if not line:
            raise QmpError("QMP: QEMU closed the monitor")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP {command}: {exc}") from None
        return self._reply(command)

    def _reply(self, command: str) -> Any:
        """The command's return value; events that arrive first are kept."""
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def getfd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file as ``name`` (SCM_RIGHTS with the ``getfd`` command): migration to and from a
        file this way needs no ``exec:`` shell, which QEMU's seccomp sandbox (spawn=deny) forbids."""
        request = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        self._sock.settimeout(10.0)
        try:
            socket.send_fds(self._sock, [request], [fd])
        except OSError as exc:
            raise QmpError(f"QMP getfd: {exc}") from None
        self._reply("getfd")

    def query_status(self) -> str:
        """"running", "paused", "shutdown", ..."""
        return str(self.execute("query-status")["status"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def quit(self) -> None:
        try:
            self.execute("quit")
        except QmpError:
            pass  # QEMU may close the monitor before its reply

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()
