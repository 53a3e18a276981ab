"""ps: list the processes of a container (--format json prints [pid,...]; table runs ps(1) and keeps the
container's rows).

usage: clave ps [--format table|json] ID [PS OPTIONS...]
"""

from __future__ import annotations

from clave import fastjson
from clave.cli.main import Parsed, UsageError, need_args
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"format": ("str", ("f",)), "help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    args = need_args(parsed, 1, "ps [--format table|json] ID [PS OPTIONS...]")
    from clave.engine.container import Engine

    pids = Engine(ctx.root, ctx.log).pids(args[0])
    fmt = parsed.flags.get("format", "table")
    if fmt == "json":
        print(fastjson.dumps(pids or None, compact=True))  # runc (Go) encodes an empty list as null
        return 0
    if fmt != "table":
        raise UsageError(f"invalid format option {fmt!r}: use table or json")
    import subprocess

    options = args[1:] or ["-ef"]
    try:
        out = subprocess.run(["ps", *options], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ClaveError(f"ps {' '.join(options)}: {exc}") from None
    lines = out.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    if "PID" not in header:
        raise ClaveError("ps output has no PID column; pass options that print one")
    column = header.index("PID")
    print(lines[0])
    wanted: set[int] = set(pids)
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in wanted:
            print(line)
    return 0
