"""Property-based fuzzing of config.json: a valid config with a few places mutated (wrong types, huge integers,
NUL bytes, lone surrogates, deep nesting, keys dropped or added) is either accepted or refused in one line of
Clave's own words naming the JSON path; never a traceback or a raw Python error, and nothing left behind.

Two drivers: ``config.spec.validate`` in-process (a large budget: it is fast), and ``clave create`` through the
real CLI (a small fixed budget, derandomized so CI runs the same examples every time).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from typing import Any

import pytest

from .conftest import Bundle, Clave, base_config, leftovers, reap, reap_zombies

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clave.config import spec  # noqa: E402

# What a refusal must never show: Python's own words for an exception that escaped a validator.
RAW_PYTHON = ("Traceback", "[Errno", "embedded null byte", "surrogates not allowed", "codec can't",
              "maximum recursion", "object of type", "internal error", "object is not", "unhashable",
              "has no attribute", "int too large", "Python int", "out of range for", "timestamp too large",
              "invalid literal", "NoneType", "'dict' object", "'list' object", "'str' object", "'int' object")

HUGE = [1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, 1 << 64, (1 << 64) - 1, 1 << 70, -(1 << 63) - 1, -1, 10**30]
NASTY_TEXT = ["a\0b", "\0", "/a\0", "\ud800", "a\udfffb", "/tmp/\ud83d", "x" * 5000, "/" + "a" * 300,
              "", "/", "..", "../../etc", "\n", "a\nb", "\u202e", "☃", "-1", "0"]


def _deep(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


_values = st.one_of(
    st.sampled_from(HUGE),
    st.integers(),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=12),
    st.sampled_from([None, True, False, 0, 1.5, float("nan"), float("inf"), [], {}, [None], {"": None}]),
    st.builds(_deep, st.sampled_from([2, 63, 64, 65, 300]), st.sampled_from([1, "x", {}])),
    st.lists(st.sampled_from(NASTY_TEXT) | st.sampled_from(HUGE), max_size=3),
    st.dictionaries(st.sampled_from(NASTY_TEXT[:6] + ["type", "path", "uid"]),
                    st.sampled_from(HUGE + NASTY_TEXT), max_size=2),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the config, but only two of the seccomp profile's hundreds of rules (so mutations spread
    over the whole document)."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        limit = 2 if prefix[-1:] in (("syscalls",), ("names",)) else len(node)
        for i, value in enumerate(node[:limit]):
            out += _paths(value, (*prefix, i))
    return out


def _mutate(doc: dict[str, Any], data: st.DataObject, protect: tuple[str, ...] = ()) -> None:
    paths = [p for p in _paths(doc) if p and p[0] not in protect]
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        parent: Any = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            current = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced this place
        if not isinstance(parent, dict | list):
            continue
        how = data.draw(st.sampled_from(["replace", "replace", "drop", "add"]), label="how")
        if how == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "add" and isinstance(current, dict):
            current[data.draw(st.sampled_from(NASTY_TEXT[:8] + ["extra", "uid", "path", "type"]))] = \
                copy.deepcopy(data.draw(_values, label="added"))
        elif how == "add" and isinstance(current, list):
            current.append(copy.deepcopy(data.draw(_values, label="appended")))
        else:
            parent[path[-1]] = copy.deepcopy(data.draw(_values, label="value"))


def _assert_clave_words(message: str) -> None:
    assert "\n" not in message.strip(), message
    for raw in RAW_PYTHON:
        assert raw not in message, f"raw Python text {raw!r} in {message!r}"


BASE = base_config(["true"])
# CLAVE_FUZZ_EXAMPLES=N runs N random (not derandomized) CLI examples, and 20 N in-process: a longer hunt by hand.
_HUNT = int(os.environ.get("CLAVE_FUZZ_EXAMPLES", "0"))


@settings(max_examples=(_HUNT * 20) or 1500, deadline=None, derandomize=not _HUNT,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_validate_accepts_or_refuses_in_one_line(data: st.DataObject) -> None:
    doc = copy.deepcopy(BASE)
    _mutate(doc, data)
    try:
        spec.validate(doc)
    except spec.ConfigError as exc:
        message = str(exc)
        assert message.startswith("config.json: "), message
        _assert_clave_words(message)


@pytest.mark.parametrize("text", [
    b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe{}", b'{"ociVersion": ' + b"9" * 5000 + b"}",
    b'{"ociVersion": NaN}', b'{"ociVersion": "1.0.0", "root": {"path": "\\ud800"}}',
])
def test_load_bundle_refuses_unparsable_text_in_one_line(tmp_path: Any, text: bytes) -> None:
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(spec.ConfigError) as caught:
        spec.load_bundle(str(tmp_path))
    assert str(caught.value).startswith("config.json")
    _assert_clave_words(str(caught.value))


@settings(max_examples=_HUNT or 30, deadline=None, derandomize=not _HUNT,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_create_refuses_in_one_line_and_leaves_nothing(clave: Clave, bundle: Bundle, data: st.DataObject) -> None:
    if not hasattr(bundle, "_fuzz_rootfs"):
        bundle.private_rootfs()  # mutated mounts create their mount points: never in the shared rootfs
        bundle._fuzz_rootfs = True  # type: ignore[attr-defined]
    doc = bundle.clone_config()
    # root.path stays the bundle's own copy: a mutated root could name a host directory to pivot into.
    _mutate(doc, data, protect=("root",))
    bundle.write(doc)
    cid = clave.id("fuzz")
    out_path, err_path = bundle.path / "fuzz.stdout", bundle.path / "fuzz.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        result = clave("create", "--bundle", str(bundle.path), "--pid-file", str(bundle.path / "fuzz.pid"), cid,
                       check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=60)
    stderr = err_path.read_text(errors="replace")
    if result.returncode != 0:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one error line, got {lines!r}"
        _assert_clave_words(lines[0])
    else:
        print("accepted:", json.dumps(doc)[:300])
        pid = int((bundle.path / "fuzz.pid").read_text())
        deleted = clave("delete", cid, check=False)  # runc deletes a created container without --force
        assert deleted.returncode == 0, deleted.stderr
        reap(pid)
    reap_zombies()
    found = leftovers(clave.root, clave.prefix, [bundle.path, bundle.rootfs])
    assert not found, f"left behind: {found} (config: {json.dumps(doc)[:2000]})"
    for name in ("fuzz.pid",):
        if (bundle.path / name).exists():
            os.unlink(bundle.path / name)
