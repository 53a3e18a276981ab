"""create: create a container; its init waits for `clave start`.

usage: clave create [--bundle DIR] [--pid-file FILE] [--console-socket SOCK] [--no-pivot] [--preserve-fds N] ID
"""

from __future__ import annotations

from clave.cli.main import Parsed, need_args
from clave.cli.options import CREATE_FLAGS, create_options

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS = CREATE_FLAGS


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "create [options] ID", exact=True)
    from clave.engine.container import Engine

    Engine(ctx.root, ctx.log, ctx.handler).create(container_id, create_options(parsed))
    return 0
