"""delete: delete a stopped container and everything create made (--force: also a running one).

usage: clave delete [--force] ID
"""

from __future__ import annotations

from clave.cli.main import Parsed, need_args
from clave.errors import NotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"force": ("bool", ("f",)), "help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id,) = need_args(parsed, 1, "delete [--force] ID", exact=True)
    from clave.engine.container import Engine

    force = parsed.flags.get("force", False)
    try:
        Engine(ctx.root, ctx.log).delete(container_id, force=force)
    except NotFound:
        if not force:
            raise
        # runc: --force on a missing container is not an error
    return 0
