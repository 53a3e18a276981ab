"""Container consoles: a pty opened inside the container, its master handed over runc's console socket."""

from __future__ import annotations

import array
import fcntl
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TIOCSCTTY = 0x540E
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int)
TIOCSWINSZ = 0x5414


class ConsoleError(Exception):
    """The console could not be set up; one line."""


def connect_socket(path: str) -> int:
    """Connect to the caller's console socket (in the runtime, where its path resolves) -> fd."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConsoleError(f"console socket {path}: {exc.strerror}") from None
    return sock.detach()


def send_fd(sock_fd: int, fd: int, name: str) -> None:
    """Send one message naming the pty, with SCM_RIGHTS carrying ``fd`` (runc's protocol)."""
    import socket

    sock = socket.socket(fileno=sock_fd)
    try:
        sock.sendmsg([name.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    finally:
        sock.close()


def recv_fd(sock: object) -> int:
    """Receive a pty master sent by send_fd (used by ``clave run`` and tests)."""
    import socket

    assert isinstance(sock, socket.socket)
    fds = array.array("i")
    _, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: fds.itemsize])
    if not fds:
        raise ConsoleError("console socket message carried no file descriptor")
    return fds[0]


def resize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def setup_in_container(sock_fd: int, size: dict[str, int] | None) -> None:
    """Open a pty from the container's /dev/ptmx, send the master, and make the slave our stdio and
    controlling terminal. Called by init after pivot_root."""
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0"))[0]
        slave_path = f"/dev/pts/{number}"
        slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
    except OSError as exc:
        raise ConsoleError(f"open container pty: {exc.strerror}") from None
    if size and (size.get("height") or size.get("width")):
        resize(slave, size.get("width", 0), size.get("height", 0))
    send_fd(sock_fd, master, slave_path)
    os.close(master)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    fcntl.ioctl(0, TIOCSCTTY, 0)
    if slave > 2:
        os.close(slave)


class ConsoleSocket:
    """The caller's side of runc's console protocol: a listening socket for --console-socket, the pty master
    received on it, and (for a foreground run/exec) copying between it and our own stdio."""

    def __init__(self) -> None:
        import socket
        import tempfile

        self._dir = tempfile.mkdtemp(prefix="clave-console-")
        self.socket_path = os.path.join(self._dir, "console.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(1)
        self.master = -1
        self._saved_tty: list | None = None  # type: ignore[type-arg]
        self._threads: list[Any] = []

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
        import threading

        if os.isatty(0):
            import termios
            import tty

            self._saved_tty = termios.tcgetattr(0)
            tty.setraw(0)
        for src, dst in ((0, self.master), (self.master, 1)):
            t = threading.Thread(target=copy_fd, args=(src, dst), daemon=True)
            t.start()
            self._threads.append(t)

    def finish(self) -> None:
        self._threads[1].join(timeout=1.0)  # drain what the container printed last
        if self._saved_tty is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, self._saved_tty)
        os.close(self.master)


def copy_fd(src: int, dst: int) -> None:
    """Copy until EOF or an error on either side (one direction of a terminal)."""
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
