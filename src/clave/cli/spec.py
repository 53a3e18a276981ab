"""spec: write a default config.json (runc's default plus a Docker-like seccomp profile) into the bundle.

usage: clave spec [--bundle DIR] [--rootless]
"""

from __future__ import annotations

import os
from typing import Any

from clave import fastjson
from clave.cli.main import Parsed
from clave.errors import ClaveError

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "bundle": ("str", ("b",)), "rootless": ("bool", ()), "help": ("bool", ("h",)),
}


def run(parsed: Parsed, ctx: Any) -> int:
    from clave.config.defaults import default_spec

    bundle = parsed.flags.get("bundle") or "."
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        raise ClaveError("File config.json exists. Remove it first")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise ClaveError(f"write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(fastjson.dumps_indented(default_spec(parsed.flags.get("rootless", False)), indent="\t"))
    return 0
