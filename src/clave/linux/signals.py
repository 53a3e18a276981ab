"""Signal names as callers give them: ``9``, ``KILL`` or ``SIGKILL`` (case-insensitive), and RT signals.

The numbers are Linux's (the same on x86-64 and arm64); a table instead of the ``signal`` module keeps
``enum`` off the path of ``clave kill``.
"""

from __future__ import annotations

SIGKILL = 9
SIGTERM = 15
SIGRTMIN = 34  # as glibc (and Python) report it: 32 and 33 are the C library's own
SIGRTMAX = 64

NUMBERS: dict[str, int] = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6, "SIGIOT": 6, "SIGBUS": 7,
    "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12, "SIGPIPE": 13, "SIGALRM": 14,
    "SIGTERM": 15, "SIGSTKFLT": 16, "SIGCHLD": 17, "SIGCLD": 17, "SIGCONT": 18, "SIGSTOP": 19, "SIGTSTP": 20,
    "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24, "SIGXFSZ": 25, "SIGVTALRM": 26, "SIGPROF": 27,
    "SIGWINCH": 28, "SIGIO": 29, "SIGPOLL": 29, "SIGPWR": 30, "SIGSYS": 31,
    "SIGRTMIN": SIGRTMIN, "SIGRTMAX": SIGRTMAX,
}


class SignalError(ValueError):
    pass


def parse_signal(raw: str) -> int:
    text = raw.strip()
    if text.isdigit():
        number = int(text)
        if number > SIGRTMAX:  # 0 probes that the process exists, as kill(2) and runc allow
            raise SignalError(f"invalid signal number {number}")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    for prefix, base, step in (("SIGRTMIN+", SIGRTMIN, 1), ("SIGRTMAX-", SIGRTMAX, -1)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            number = base + step * int(name[len(prefix):])
            if SIGRTMIN <= number <= SIGRTMAX:
                return number
    if name in NUMBERS:
        return NUMBERS[name]
    raise SignalError(f"unknown signal {raw!r}")
