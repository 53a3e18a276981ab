"""Run a function in a forked child (where seccomp filters, capability drops and rlimits stay contained)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ChildResult:
    status: int  # os.waitpid status
    value: Any = None  # what the function returned (JSON round-tripped)
    error: str | None = None  # "ExceptionType: message" if it raised

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    def ok(self) -> Any:
        assert self.signal is None, f"child killed by signal {self.signal}"
        assert self.error is None, self.error
        return self.value


def run_in_child(fn: Callable[..., Any], *args: Any) -> ChildResult:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            try:
                payload = {"value": fn(*args)}
            except BaseException as exc:  # noqa: B036 - everything must be reported to the parent
                payload = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(payload).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    payload = json.loads(b"".join(chunks) or b"{}")
    return ChildResult(status, payload.get("value"), payload.get("error"))
