"""Flags shared by `create` and `run`, and turning them into engine options."""

from __future__ import annotations

import os

from clave.cli.main import Parsed, UsageError
from clave.engine.container import CreateOptions

CREATE_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "bundle": ("str", ("b",)),
    "pid-file": ("str", ()),
    "console-socket": ("str", ()),
    "no-pivot": ("bool", ()),
    "no-new-keyring": ("bool", ()),
    "preserve-fds": ("int", ()),
    "help": ("bool", ("h",)),
}


def create_options(parsed: Parsed, detach_check: bool = True) -> CreateOptions:
    preserve = parsed.flags.get("preserve-fds", 0)
    if preserve < 0:
        raise UsageError("--preserve-fds must not be negative")
    listen = 0
    if os.environ.get("LISTEN_FDS", "").isdigit():
        listen = int(os.environ["LISTEN_FDS"])
    _reserve_fds(3 + listen + preserve)
    return CreateOptions(
        bundle=parsed.flags.get("bundle") or os.getcwd(),
        pid_file=parsed.flags.get("pid-file"),
        console_socket=parsed.flags.get("console-socket"),
        no_pivot=parsed.flags.get("no-pivot", False),
        preserve_fds=preserve,
        listen_fds=listen,
        detach_check=detach_check,
    )


def _reserve_fds(upto: int) -> None:
    """Occupy missing fds below ``upto`` with /dev/null so clave's own files never land where the
    container expects inherited ones."""
    for fd in range(3, upto):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open("/dev/null", os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
