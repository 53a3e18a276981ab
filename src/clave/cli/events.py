"""events: print container statistics and OOM notices as JSON lines.

usage: clave events [--stats] [--interval 5s] ID
--stats prints one stats event and exits; otherwise a stats event every interval and an "oom" event when the
kernel's OOM killer kills a process of the container, until the container stops.
"""

from __future__ import annotations

import time

from clave import fastjson
from clave.cli.main import Parsed, UsageError, need_args
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stats": ("bool", ()), "interval": ("str", ()), "help": ("bool", ("h",)),
}


def parse_duration(text: str) -> float:
    """Go-style durations as runc takes them: 500ms, 5s, 1m, 1h (or plain seconds)."""
    number, scale = text, 1.0
    for suffix, unit in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], unit
            break
    try:
        value = float(number) * scale
    except ValueError:
        raise UsageError(f"invalid duration {text!r} (use e.g. 500ms, 5s, 1m)") from None
    if value <= 0:
        raise UsageError("--interval must be positive")
    return value


def run(parsed: Parsed, ctx: Any) -> int:
    (container_id, *_) = need_args(parsed, 1, "events [--stats] [--interval 5s] ID", exact=True)
    from clave.engine.container import Engine

    engine = Engine(ctx.root, ctx.log)
    interval = parse_duration(parsed.flags.get("interval", "5s"))

    def emit(kind: str, data: dict[str, Any] | None = None) -> None:
        event: dict[str, Any] = {"type": kind, "id": container_id}
        if data is not None:
            event["data"] = data
        print(fastjson.dumps(event, compact=True), flush=True)

    # The first stats fail for a container that is not running, as runc's events do; later failures end the
    # stream (the container stopped).
    emit("stats", engine.stats(container_id))
    if parsed.flags.get("stats"):
        return 0
    ooms = engine.oom_kills(container_id)
    next_stats = time.monotonic() + interval
    while True:
        try:
            if time.monotonic() >= next_stats:
                emit("stats", engine.stats(container_id))
                next_stats += interval
            count = engine.oom_kills(container_id)
        except ClaveError:
            return 0  # the container is gone or stopped: the stream ends
        if count > ooms:
            emit("oom")
            ooms = count
        time.sleep(min(0.2, interval))
