"""A process's stdio as containerd hands it to a shim: FIFO paths, ``file://`` and ``binary://`` log URIs, or
a terminal whose master the shim copies to and from the FIFOs."""

from __future__ import annotations

import os
import threading

from clave.linux.console import copy_fd, resize


class ProcessIO:
    """The three fds the container gets, plus what the shim keeps (copy threads, logging binaries)."""

    def __init__(self, stdin: str, stdout: str, stderr: str, terminal: bool,
                 logger_env: dict[str, str] | None = None) -> None:
        self.paths = (stdin, stdout, stderr)
        self.logger_env = logger_env or {}  # CONTAINER_ID and CONTAINER_NAMESPACE for a binary:// logger
        self.terminal = terminal
        self.container_fds: tuple[int, int, int] | None = None
        self._opened: list[int] = []
        self._logger_pid = 0  # a binary:// logger; it exits on EOF and the shim's reaper collects it
        self.master = -1
        self._stdin_fd = -1
        # The shim's Start holds it from open() until the container has its copies (after_start, or close on
        # failure): containerd's CloseIO can arrive meanwhile (ctr sends it as soon as its own stdin ends, racing
        # its Start) and must not close the stdin fd the container is being given.
        self.handover = threading.Lock()

    # -- plain (non-terminal) IO: the container writes straight into the FIFOs or log files
    def open(self) -> tuple[int, int, int]:
        stdin, stdout, stderr = self.paths
        null = self._track(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        if stdout.startswith("binary://"):
            out_fd, err_fd = self._start_logger(stdout)
        else:
            out_fd = self._open_output(stdout) if stdout else null
            err_fd = self._open_output(stderr) if stderr else null
        in_fd = self._open_input(stdin) if stdin else null
        self.container_fds = (in_fd, out_fd, err_fd)
        return self.container_fds

    def _track(self, fd: int) -> int:
        self._opened.append(fd)
        return fd

    def _open_input(self, path: str) -> int:
        # O_NONBLOCK so opening cannot hang when the writer is late; the container then reads blocking.
        fd = self._track(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        os.set_blocking(fd, True)
        self._stdin_fd = fd
        return fd

    def _open_output(self, uri: str) -> int:
        if uri.startswith("file://"):
            path = uri[len("file://"):]
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            return self._track(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
        # A FIFO: O_RDWR never blocks on open, and containerd's reader is already there.
        return self._track(os.open(uri, os.O_RDWR | os.O_CLOEXEC))

    def _start_logger(self, uri: str) -> tuple[int, int]:
        """binary:///path?k=v: containerd's logging-binary protocol. The binary gets the container's stdout on
        fd 3, stderr on fd 4, closes fd 5 once it is ready, and gets each query key and non-empty value as
        arguments."""
        import fcntl
        from urllib.parse import parse_qsl, urlsplit

        parts = urlsplit(uri)
        args = [a for kv in parse_qsl(parts.query, keep_blank_values=True) for a in kv if a]
        out_r, out_w = self._track_pipe()
        err_r, err_w = self._track_pipe()
        ready_r, ready_w = os.pipe()
        # Copies above fd 9 (close-on-exec) so the dup2s onto 3, 4 and 5 cannot clobber one another.
        sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (out_r, err_r, ready_w)]
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in zip(sources, (3, 4, 5), strict=True)]
        try:
            self._logger_pid = os.posix_spawn(parts.path, [parts.path, *args], {**os.environ, **self.logger_env},
                                              file_actions=actions, setsid=True)
        except OSError:
            os.close(ready_r)
            raise
        finally:
            for fd in sources:
                os.close(fd)
        try:
            os.read(ready_r, 1)  # returns when the binary closes fd 5 (ready) or exits
        finally:
            os.close(ready_r)
        return out_w, err_w

    def _track_pipe(self) -> tuple[int, int]:
        """A pipe whose write end is tracked (closed with this IO even if starting the logger fails)."""
        read_end, write_end = os.pipe()
        return read_end, self._track(write_end)

    # -- terminal IO: the shim owns the pty master and copies
    def attach_master(self, master: int) -> None:
        self.master = master
        stdin, stdout, _ = self.paths
        if stdin:
            src = os.open(stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(src, True)
            self._stdin_fd = src
            self._opened.append(src)
            threading.Thread(target=copy_fd, args=(src, master), daemon=True, name="tty-in").start()
        if stdout:
            dst = os.open(stdout, os.O_RDWR | os.O_CLOEXEC)
            self._opened.append(dst)
            threading.Thread(target=copy_fd, args=(master, dst), daemon=True, name="tty-out").start()

    def resize(self, width: int, height: int) -> None:
        if self.master >= 0:
            resize(self.master, width, height)

    def close_stdin(self) -> None:
        with self.handover:
            if self._stdin_fd >= 0:
                try:
                    os.close(self._stdin_fd)
                    self._opened.remove(self._stdin_fd)
                except (OSError, ValueError):
                    pass
                self._stdin_fd = -1

    def after_start(self) -> None:
        """The container has its copies: drop the shim's (so readers see EOF when the container exits)."""
        if not self.terminal:
            for fd in self._opened:
                if fd != self._stdin_fd:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._opened = [self._stdin_fd] if self._stdin_fd >= 0 else []

    def close(self) -> None:
        for fd in self._opened:
            try:
                os.close(fd)
            except OSError:
                pass
        self._opened = []
        if self.master >= 0:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = -1

