"""features: print what this clave supports, as runtime-spec features.md describes.

usage: clave features
"""

from __future__ import annotations

from typing import Any

from clave import fastjson
from clave.cli.main import Parsed

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    from clave.config.features import features

    print(fastjson.dumps_indented(features(), indent="    "))
    return 0
