"""runc-style logging: ``--log FILE --log-format text|json``; JSON lines carry level, msg and time."""

from __future__ import annotations

import os
import sys
import time

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False,
                 stream: IO[str] | None = None) -> None:
        self.path = path if stream is None else "(stream)"
        self.fmt = fmt
        self.threshold = LEVELS["debug"] if debug else LEVELS["info"]
        self._stream: IO[str] | None = stream

    def touch(self) -> None:
        """Create the log file now, as runc does: callers read it after a failure even if nothing was logged."""
        if not self.to_stderr:
            self._out()

    @property
    def to_stderr(self) -> bool:
        return self.path in (None, "", "/dev/stderr")

    def _out(self) -> IO[str]:
        if self._stream is None:
            if self.to_stderr:
                self._stream = sys.stderr
            else:
                assert self.path is not None
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                self._stream = os.fdopen(fd, "a", buffering=1)
        return self._stream

    def log(self, level: str, msg: str) -> None:
        if LEVELS[level] < self.threshold:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.fmt == "json":
            line = fastjson.dumps({"level": level, "msg": msg, "time": stamp}, compact=True)
        else:
            line = f"time=\"{stamp}\" level={level} msg={fastjson.dumps(msg)}"
        try:
            self._out().write(line + "\n")
        except OSError:
            pass

    def debug(self, msg: str) -> None:
        self.log("debug", msg)

    def info(self, msg: str) -> None:
        self.log("info", msg)

    def warning(self, msg: str) -> None:
        self.log("warning", msg)

    def error(self, msg: str) -> None:
        self.log("error", msg)
