"""update: change the cgroup resources of a running container.

usage: clave update [--resources FILE|-] [--memory N] [--memory-swap N] [--memory-reservation N]
                    [--cpu-shares N] [--cpu-quota N] [--cpu-period N] [--cpuset-cpus LIST] [--cpuset-mems LIST]
                    [--pids-limit N] [--blkio-weight N] [--cpu-rt-period N] [--cpu-rt-runtime N] ID
"""

from __future__ import annotations

import sys

from clave import fastjson
from clave.cli.main import Parsed, UsageError, need_args
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# flag -> (resource section, key, kind)
_RESOURCE_FLAGS: dict[str, tuple[str, str, str]] = {
    "memory": ("memory", "limit", "bytes"),
    "memory-swap": ("memory", "swap", "bytes"),
    "memory-reservation": ("memory", "reservation", "bytes"),
    "kernel-memory": ("memory", "kernel", "bytes"),
    "kernel-memory-tcp": ("memory", "kernelTCP", "bytes"),
    "cpu-shares": ("cpu", "shares", "int"),
    "cpu-quota": ("cpu", "quota", "int"),
    "cpu-period": ("cpu", "period", "int"),
    "cpu-rt-period": ("cpu", "realtimePeriod", "int"),
    "cpu-rt-runtime": ("cpu", "realtimeRuntime", "int"),
    "cpuset-cpus": ("cpu", "cpus", "str"),
    "cpuset-mems": ("cpu", "mems", "str"),
    "pids-limit": ("pids", "limit", "int"),
    "blkio-weight": ("blockIO", "weight", "int"),
}
FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resources": ("str", ("r",)),
    "help": ("bool", ("h",)),
    **{name: ("str", ()) for name in _RESOURCE_FLAGS},
}
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(text: str, flag: str) -> int:
    raw = text.strip().lower().rstrip("b")
    scale = _UNITS.get(raw[-1:], 1)
    if raw[-1:] in _UNITS:
        raw = raw[:-1]
    try:
        value = int(float(raw) * scale)
    except ValueError:
        raise UsageError(f"invalid value {text!r} for --{flag}") from None
    return value


def resources_from(parsed: Parsed) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    source = parsed.flags.get("resources")
    if source:
        try:
            if source == "-":
                raw = sys.stdin.buffer.read()
            else:
                with open(source, "rb") as f:
                    raw = f.read()
            resources = fastjson.loads(raw)
        except OSError as exc:
            raise ClaveError(f"resources file {source}: {exc.strerror}") from None
        except ValueError as exc:
            raise ClaveError(f"resources: invalid JSON: {exc}") from None
        if not isinstance(resources, dict):
            raise ClaveError("resources: must be a JSON object (OCI linux.resources)")
    for flag, (section, key, kind) in _RESOURCE_FLAGS.items():
        if flag not in parsed.flags:
            continue
        text = parsed.flags[flag]
        if kind == "bytes":
            value: Any = -1 if text.strip() == "-1" else _bytes(text, flag)
        elif kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise UsageError(f"invalid value {text!r} for --{flag}: must be an integer") from None
        else:
            value = text
        resources.setdefault(section, {})[key] = value
    return resources


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "update [options] ID", exact=True)
    resources = resources_from(parsed)  # may be empty: runc then only checks the container is running
    from clave.engine.container import Engine

    Engine(ctx.root, ctx.log).update(container_id, resources)
    return 0
