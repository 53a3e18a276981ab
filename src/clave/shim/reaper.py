"""The shim's reaper: the shim is a subreaper, so every container init and exec'd process ends up as its child.

One thread reaps everything on SIGCHLD and hands exit statuses to whoever waits for that pid. Engine calls that
fork and wait for their own children (create's intermediate, hook processes) hold ``exclusive`` so the reaper
does not steal those statuses.
"""

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class Exit:
    __slots__ = ("pid", "status", "at_ns")

    def __init__(self, pid: int, status: int, at_ns: int) -> None:
        self.pid = pid
        self.status = status  # shell-style: the exit code, or 128 + signal
        self.at_ns = at_ns


class Reaper:
    def __init__(self, on_exit: Callable[[Exit], None]) -> None:
        self.exclusive = threading.RLock()  # held around engine calls that wait for their own children
        self._on_exit = on_exit
        self._wake = threading.Event()

    def start(self) -> None:
        import _signal

        _signal.signal(_signal.SIGCHLD, lambda *_: self._wake.set())
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(0.5)  # the timeout covers a SIGCHLD that raced with the last reap
            self._wake.clear()
            with self.exclusive:
                self._reap_all()

    def _reap_all(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            self._on_exit(Exit(pid, code if code >= 0 else 128 - code, time.time_ns()))
