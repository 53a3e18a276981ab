"""The console for a foreground `clave run` with a terminal: receive the pty master, copy it to our stdio."""

from __future__ import annotations

import os
import socket
import tempfile
import threading

from clave.linux.console import recv_fd


class Console:
    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="clave-console-")
        self.socket_path = os.path.join(self._dir, "console.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(1)
        self.master = -1
        self._saved_tty: list | None = None  # type: ignore[type-arg]
        self._threads: list[threading.Thread] = []

    def accept(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            self.master = recv_fd(conn)

    def close_listener(self) -> None:
        self._listener.close()
        try:
            os.unlink(self.socket_path)
            os.rmdir(self._dir)
        except OSError:
            pass

    def start_copying(self) -> None:
        if os.isatty(0):
            import termios
            import tty

            self._saved_tty = termios.tcgetattr(0)
            tty.setraw(0)
        for src, dst in ((0, self.master), (self.master, 1)):
            t = threading.Thread(target=_copy, args=(src, dst), daemon=True)
            t.start()
            self._threads.append(t)

    def finish(self) -> None:
        self._threads[1].join(timeout=1.0)  # drain what the container printed last
        if self._saved_tty is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, self._saved_tty)
        os.close(self.master)


def _copy(src: int, dst: int) -> None:
    while True:
        try:
            data = os.read(src, 65536)
        except OSError:
            return
        if not data:
            return
        try:
            os.write(dst, data)
        except OSError:
            return
