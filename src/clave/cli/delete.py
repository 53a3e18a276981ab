"""delete: delete a stopped container and everything create made (--force: also a running one).

usage: clave delete [--force] ID
"""

from __future__ import annotations

from clave.cli.main import Parsed, need_args
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"force": ("bool", ("f",)), "help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    args = need_args(parsed, 1, "delete [--force] ID")
    from clave.engine.container import Engine

    engine = Engine(ctx.root, ctx.log)
    force = parsed.flags.get("force", False)
    for container_id in args:
        try:
            engine.delete(container_id, force=force)
        except ClaveError as exc:
            if force and "does not exist" in str(exc):
                continue  # runc: --force on a missing container is not an error
            raise
    return 0
