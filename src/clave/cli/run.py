"""run: create and start a container, wait for it, delete it, and exit with its status (128+N if killed by
signal N). With --detach: create and start only.

usage: clave run [--bundle DIR] [--detach] [--keep] [--pid-file FILE] [--console-socket SOCK] [--no-pivot]
                 [--preserve-fds N] ID
"""

from __future__ import annotations

import _signal as signal  # the signal module's enum import costs ~5 ms on every run

from clave.cli.main import Parsed, need_args, resume_gc
from clave.cli.options import CREATE_FLAGS, create_options
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

FLAGS = {
    **CREATE_FLAGS,
    "detach": ("bool", ("d",)),
    "keep": ("bool", ()),
    "no-subreaper": ("bool", ()),
}

# Signals a foreground `run` forwards to the container, as runc does.
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
              signal.SIGWINCH)


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "run [options] ID", exact=True)
    from clave.engine.container import Engine
    from clave.linux import sys as lsys

    detach = parsed.flags.get("detach", False)
    opts = create_options(parsed, detach_check=detach)
    engine = Engine(ctx.root, ctx.log, ctx.handler)
    if not detach:
        lsys.set_child_subreaper()  # the init is re-parented to us when the intermediate exits
    config = engine.load_config(opts.bundle)  # parsed once: create takes it too
    console = None
    if not detach and not opts.console_socket and config.get("process", {}).get("terminal"):
        from clave.linux.console import ConsoleSocket

        console = ConsoleSocket()
        opts.console_socket = console.socket_path
    try:
        engine.create(container_id, opts, config)
        if console is not None:
            console.accept()
        try:
            engine.start(container_id)
        except BaseException:
            engine.delete(container_id, force=True)
            raise
    finally:
        if console is not None:
            console.close_listener()
    if detach:
        return 0
    resume_gc()  # the container may run for long: from here the collector is on (see clave.cli.main)
    forward_signals(lambda num: engine.kill(container_id, num))
    if console is not None:
        console.start_copying()
    status = engine.wait(container_id)
    if console is not None:
        console.finish()
    if not parsed.flags.get("keep"):
        engine.delete(container_id, force=True)
    return status


def forward_signals(send: Callable[[int], None]) -> None:
    """Pass the signals a foreground run/exec receives on to the container (``send(signal)``)."""

    def forward(num: int, _frame: object) -> None:
        try:
            send(num)
        except ClaveError:
            pass  # already gone

    for sig in _FORWARDED:
        signal.signal(sig, forward)
