"""state: print the state of a container as JSON.

usage: clave state ID
"""

from __future__ import annotations

import json

from clave.cli.main import Parsed, need_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "state ID")
    from clave.engine.container import Engine

    print(json.dumps(Engine(ctx.root, ctx.log).state(container_id), indent=2))
    return 0
