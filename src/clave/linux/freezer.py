"""The one reader of a cgroup's freezer state: the v1 freezer controller when the cgroup has one, else cgroup2's
``cgroup.events``. Kept outside the cgroups package so that `clave state` does not import the managers."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


def frozen(paths: Mapping[str, str]) -> bool:
    """Is the cgroup at ``paths`` (a manager's paths(): controller or "unified" → directory) frozen?"""
    v1 = paths.get("freezer")
    if v1:
        return _read(v1 + "/freezer.state").strip() == b"FROZEN"
    v2 = paths.get("unified")
    if v2:
        return any(line.split() == [b"frozen", b"1"] for line in _read(v2 + "/cgroup.events").splitlines())
    return False


def _read(path: str) -> bytes:
    """Bytes, not text: a text open looks up the locale's codec (encodings.aliases, ~1 ms per command)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the cgroup is gone
        return b""
