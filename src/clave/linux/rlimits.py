"""Resource limits from OCI `process.rlimits`: [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]."""

from __future__ import annotations

import errno
import resource

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class RlimitError(Exception):
    """An rlimit that is unknown, malformed, or that the kernel refused."""


# Resource numbers of x86 and arm (asm-generic/resource.h); the resource module lacks some (RLIMIT_LOCKS).
RLIMITS: dict[str, int] = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}
_U64_MAX = (1 << 64) - 1


def _limit(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64_MAX:
        raise RlimitError(f"{field} {value!r} is not an unsigned 64-bit integer")
    # RLIM_INFINITY is the all-ones u64 in the config; Python's resource module spells it -1.
    return resource.RLIM_INFINITY if value == _U64_MAX else value


def parse(rlimits: Iterable[Mapping[str, object]]) -> list[tuple[str, int, int, int]]:
    """Validate the list: (name, resource number, soft, hard) per entry; a type listed twice is an error."""
    parsed = []
    seen = set()
    for entry in rlimits:
        name = entry.get("type")
        if not isinstance(name, str) or name not in RLIMITS:
            raise RlimitError(f"unknown rlimit type {name!r}")
        if name in seen:
            raise RlimitError(f"rlimit {name} is listed twice")
        seen.add(name)
        soft = _limit(entry.get("soft"), f"{name} soft limit")
        hard = _limit(entry.get("hard"), f"{name} hard limit")
        if _unsigned(soft) > _unsigned(hard):
            raise RlimitError(f"{name}: soft limit {_show(soft)} is above the hard limit {_show(hard)}")
        parsed.append((name, RLIMITS[name], soft, hard))
    return parsed


def _unsigned(value: int) -> int:
    return _U64_MAX if value == resource.RLIM_INFINITY else value


def apply(rlimits: Iterable[Mapping[str, object]]) -> None:
    """setrlimit for each entry. Raising a hard limit needs CAP_SYS_RESOURCE, which these hosts lack."""
    for name, number, soft, hard in parse(rlimits):
        try:
            resource.setrlimit(number, (soft, hard))
        except (ValueError, OSError) as exc:
            current_hard = resource.getrlimit(number)[1]
            if _unsigned(hard) > _unsigned(current_hard):
                shown = "unlimited" if current_hard == resource.RLIM_INFINITY else str(current_hard)
                raise RlimitError(
                    f"{name}: hard limit {_show(hard)} is above the current hard limit {shown}; "
                    "raising it needs CAP_SYS_RESOURCE"
                ) from None
            code = getattr(exc, "errno", None) or errno.EINVAL
            raise RlimitError(f"{name}: setrlimit(soft={_show(soft)}, hard={_show(hard)}) failed: {exc}"
                              f" ({errno.errorcode.get(code, code)})") from None


def _show(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
