"""A process's identity from /proc: its pid plus its start time tells it from a later process given the same pid.

Kept free of imports: `clave state` and every status check read it.
"""

from __future__ import annotations


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of an existing process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def start_time(pid: int) -> int:
    """A process's start time in clock ticks (0 if it is gone): with the pid, what tells it from a recycled one."""
    stat = proc_stat(pid)
    return stat[1] if stat else 0


def alive(pid: int, start: int) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` and has not exited (a zombie has)."""
    stat = proc_stat(pid) if pid > 0 else None
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == start
