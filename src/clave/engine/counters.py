"""What a container's runtime answered beyond the OCI verbs (evidence, KBS fetches), counted in the container's
state directory: the requests come from any process (`clave attest ID`, clave-relay, the shim) through
``Engine._request``, and whoever reports metrics (the shim) reads the counts there. The file goes with the
container's state directory.

Written under the state directory's lock (the engine holds it around every request), by rename: readers never
see half a file.
"""

from __future__ import annotations

import os

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from clave.errors import ClaveError

COUNTERS_FILE = "counters.json"
# What clave.kbs.client says when the broker answered with a refusal (its verdict) rather than not at all.
KBS_REFUSAL = "KBS refused"


def read(state_dir: str) -> dict[str, int]:
    try:
        with open(os.path.join(state_dir, COUNTERS_FILE), "rb") as f:
            counts = fastjson.loads(f.read())
    except (OSError, ValueError):
        return {}
    return counts if isinstance(counts, dict) else {}


def outcome(op: str, exc: ClaveError | None) -> str:
    """``attest.ok`` / ``attest.failed``; ``kbs.released`` / ``kbs.refused`` (the broker's verdict) / ``kbs.failed``
    (no verdict: unreachable, bad settings)."""
    if exc is None:
        return f"{op}.released" if op == "kbs" else f"{op}.ok"
    if op == "kbs" and KBS_REFUSAL in str(exc):
        return "kbs.refused"
    return f"{op}.failed"


def record(state_dir: str, key: str) -> None:
    """Add one to ``key``; the caller holds the state directory's lock."""
    counts = read(state_dir)
    counts[key] = int(counts.get(key, 0)) + 1
    path = os.path.join(state_dir, COUNTERS_FILE)
    tmp = os.path.join(state_dir, f".{COUNTERS_FILE}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(fastjson.dumps(counts, compact=True))
        os.rename(tmp, path)
    except OSError:
        pass  # counting must never fail the request itself
