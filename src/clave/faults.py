"""Fault injection for tests: a process stops at a named step when CLAVE_TEST_PAUSE_AT names it."""

from __future__ import annotations

import os


def pause_point(step: str) -> None:
    """Stop here (SIGSTOP) when CLAVE_TEST_PAUSE_AT names this step; the test then kills or inspects us. A pid
    namespace's init ignores SIGSTOP from inside: it renames itself "clave-paused" and waits to be killed."""
    if os.environ.get("CLAVE_TEST_PAUSE_AT") == step:
        if os.getpid() == 1:
            import _signal

            with open("/proc/self/comm", "w") as comm:
                comm.write("clave-paused")
            while True:
                _signal.pause()
        os.kill(os.getpid(), 19)  # SIGSTOP
