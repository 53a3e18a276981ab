"""resume: thaw a paused container.

usage: clave resume ID
"""

from __future__ import annotations

from clave.cli.main import Parsed, need_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "resume ID", exact=True)
    from clave.engine.container import Engine

    Engine(ctx.root, ctx.log).resume(container_id)
    return 0
