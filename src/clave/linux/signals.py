"""Signal names as callers give them: ``9``, ``KILL`` or ``SIGKILL`` (case-insensitive), and RT signals."""

from __future__ import annotations

import signal


class SignalError(ValueError):
    pass


def parse_signal(raw: str) -> int:
    text = raw.strip()
    if text.isdigit():
        number = int(text)
        if not 0 < number <= signal.SIGRTMAX:
            raise SignalError(f"invalid signal number {number}")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    for prefix, base, step in (("SIGRTMIN+", signal.SIGRTMIN, 1), ("SIGRTMAX-", signal.SIGRTMAX, -1)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            number = base + step * int(name[len(prefix):])
            if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
                return number
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise SignalError(f"unknown signal {raw!r}") from None
