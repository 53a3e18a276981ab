"""Per-process attributes from the OCI config: `linux.personality` and `process.oomScoreAdj`."""

from __future__ import annotations

import os
from collections.abc import Mapping

from clave.linux import ffi  # not ctypes: see that module


class ProcAttrError(Exception):
    """A personality or OOM score setting that is invalid or was refused."""


# personality(2) domains the runtime spec names.
PERSONALITY_DOMAINS = {"LINUX": 0x0000, "LINUX32": 0x0008}
PERSONALITY_QUERY = 0xFFFFFFFF


def _personality(persona: int) -> int:
    result = int(ffi.libc().personality(ffi.c_ulong(persona)))
    if result == -1:
        raise ProcAttrError(f"personality({persona:#x}): {os.strerror(ffi.get_errno())}")
    return result


def personality(config: Mapping[str, object]) -> None:
    """Set the execution domain from `linux.personality` ({"domain": "LINUX32", "flags": []}).

    The spec defines no flags yet, so any flag is an error rather than silently dropped."""
    domain = config.get("domain")
    if not isinstance(domain, str) or domain not in PERSONALITY_DOMAINS:
        known = ", ".join(PERSONALITY_DOMAINS)
        raise ProcAttrError(f"linux.personality.domain {domain!r} is not one of {known}")
    flags = config.get("flags") or []
    if flags:
        raise ProcAttrError(f"linux.personality.flags {flags!r} are not supported")
    _personality(PERSONALITY_DOMAINS[domain])


def current_personality() -> int:
    return _personality(PERSONALITY_QUERY)


def set_oom_score_adj(score: int, pid: int | str = "self") -> None:
    """Write `process.oomScoreAdj` (-1000..1000). Lowering it below the current value needs
    CAP_SYS_RESOURCE, which these hosts lack: the error says so."""
    if not isinstance(score, int) or isinstance(score, bool) or not -1000 <= score <= 1000:
        raise ProcAttrError(f"oomScoreAdj {score!r} is not an integer in -1000..1000")
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except PermissionError:
        raise ProcAttrError(
            f"oomScoreAdj {score}: lowering the OOM score adjustment needs CAP_SYS_RESOURCE"
        ) from None
    except OSError as exc:
        raise ProcAttrError(f"oomScoreAdj {score}: {exc.strerror}") from None
