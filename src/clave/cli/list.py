"""list: list the containers under --root.

usage: clave list [--format table|json] [--quiet]
"""

from __future__ import annotations

from clave import fastjson
from clave.cli.main import Parsed, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "format": ("str", ("f",)), "quiet": ("bool", ("q",)), "help": ("bool", ("h",)),
}


def run(parsed: Parsed, ctx: Any) -> int:
    from clave.engine.container import Engine

    states = Engine(ctx.root, ctx.log).list_states()
    fmt = parsed.flags.get("format", "table")
    if parsed.flags.get("quiet"):
        for s in states:
            print(s["id"])
    elif fmt == "json":
        print(fastjson.dumps(states or None))  # runc (Go) encodes an empty list as null
    elif fmt == "table":
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]) for s in states]
        # runc's tabwriter layout: every column but the last at least 12 wide, 3 spaces after the longest cell.
        widths = [max(12, max(len(r[i]) for r in rows) + 3) for i in range(5)]
        for r in rows:
            print("".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + r[5])
    else:
        raise UsageError(f"invalid format option {fmt!r}: use table or json")
    return 0
