"""pause: freeze every process of a running container (cgroup freezer).

usage: clave pause ID
"""

from __future__ import annotations

from clave.cli.main import Parsed, need_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "pause ID", exact=True)
    from clave.engine.container import Engine

    Engine(ctx.root, ctx.log).pause(container_id)
    return 0
