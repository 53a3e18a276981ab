"""state: print the state of a container as JSON.

usage: clave state ID
"""

from __future__ import annotations

from clave import fastjson
from clave.cli.main import Parsed, need_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "state ID", exact=True)
    from clave.engine.container import Engine

    print(fastjson.dumps_indented(Engine(ctx.root, ctx.log).state(container_id)))
    return 0
