"""kill: send a signal (default SIGTERM) to the container's init, or with --all to all its processes.

usage: clave kill [--all] ID [SIGNAL]   (SIGNAL as 9, KILL or SIGKILL)
"""

from __future__ import annotations

from clave.cli.main import Parsed, UsageError, need_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"all": ("bool", ("a",)), "help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    args = need_args(parsed, 1, "kill [--all] ID [SIGNAL]")
    from clave.linux.signals import SIGTERM, SignalError, parse_signal

    try:
        sig = parse_signal(args[1]) if len(args) > 1 else SIGTERM
    except SignalError as exc:
        raise UsageError(str(exc)) from None
    from clave.engine.container import Engine

    Engine(ctx.root, ctx.log).kill(args[0], sig, parsed.flags.get("all", False))
    return 0
