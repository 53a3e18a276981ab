"""features: print what this clave supports, as runtime-spec features.md describes.

usage: clave features
"""

from __future__ import annotations

import json
from typing import Any

from clave.cli.main import Parsed

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"help": ("bool", ("h",))}


def run(parsed: Parsed, ctx: Any) -> int:
    from clave.config.features import features

    print(json.dumps(features(), indent=4))
    return 0
