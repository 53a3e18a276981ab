"""config.md hooks: each kind at its moment with the state on stdin, args, env and timeout; what a failing
hook of each kind does."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import Bundle, Clave, reap

HOOK = 'cat > "$2/$1.json"; echo "$1 $HOOK_ENV $3" >> "$2/order"'
EXPECTED_STATUS = {"prestart": "creating", "createRuntime": "creating", "createContainer": "creating",
                   "startContainer": "created", "poststart": "running", "poststop": "stopped"}


def recording_hook(kind: str, out: str, **extra: Any) -> dict[str, Any]:
    return {"path": "/bin/sh", "args": ["sh", "-c", HOOK, "hook", kind, out, "arg3"], "env": ["HOOK_ENV=env-ok"],
            **extra}


def order(bundle: Bundle) -> list[str]:
    path = bundle.out / "order"
    return path.read_text().splitlines() if path.exists() else []


def wait_lines(bundle: Bundle, count: int) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(order(bundle)) < count:
        time.sleep(0.01)
    return order(bundle)


def test_every_hook_kind_in_order(clave: Clave, bundle: Bundle) -> None:
    host_out = str(bundle.out)
    bundle.config["hooks"] = {
        kind: [recording_hook(kind, "/out" if kind == "startContainer" else host_out)]
        for kind in EXPECTED_STATUS
    }
    bundle.sh("echo process >> /out/order; exec sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    after_create = order(bundle)
    assert sorted(after_create[:2]) == ["createRuntime env-ok arg3", "prestart env-ok arg3"]
    assert after_create[2:] == ["createContainer env-ok arg3"]
    clave("start", cid)
    lines = wait_lines(bundle, 6)
    assert lines[3] == "startContainer env-ok arg3"
    assert set(lines[4:]) == {"process", "poststart env-ok arg3"}
    clave("kill", cid, "KILL")
    reap(pid)
    clave("delete", cid)
    assert order(bundle)[-1] == "poststop env-ok arg3"
    for kind, status in EXPECTED_STATUS.items():
        state = json.loads((bundle.out / f"{kind}.json").read_text())
        assert state["id"] == cid and state["status"] == status, (kind, state)
        assert state["ociVersion"] == bundle.config["ociVersion"]
        assert state["bundle"] == str(bundle.path), kind
        if kind in ("prestart", "createRuntime", "poststart"):
            assert state["pid"] == pid, kind
        elif kind in ("createContainer", "startContainer"):
            assert state["pid"] in (1, pid), kind  # runc reports the init's pid as it sees itself


def test_hook_timeout(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None]) -> None:
    bundle.config["hooks"] = {"prestart": [{"path": "/bin/sleep", "args": ["sleep", "20"], "timeout": 1}]}
    bundle.write()
    started = time.monotonic()
    message = clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert time.monotonic() - started < 10
    assert "prestart" in message and "timed out" in message
    assert_clean()


@pytest.mark.parametrize("kind", ["prestart", "createRuntime", "createContainer"])
def test_failing_create_hook_fails_create(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None],
                                          kind: str) -> None:
    bundle.config["hooks"] = {kind: [{"path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}]}
    bundle.sh("echo ran > /out/ran")
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert kind in message and "3" in message
    assert not (bundle.out / "ran").exists()
    assert_clean()


def test_failing_start_container_hook_fails_start(clave: Clave, bundle: Bundle) -> None:
    bundle.config["hooks"] = {"startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 4"]}]}
    bundle.sh("echo ran > /out/ran; sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    assert "startContainer" in clave.fail("start", cid)
    reap(pid)
    assert clave.state(cid)["status"] == "stopped"
    assert not (bundle.out / "ran").exists()
    clave("delete", cid)


@pytest.mark.parametrize("kind", ["poststart", "poststop"])
def test_failing_post_hook_is_a_warning(clave: Clave, bundle: Bundle, kind: str) -> None:
    bundle.config["hooks"] = {kind: [{"path": "/bin/sh", "args": ["sh", "-c", "exit 5"]}]}
    bundle.sh("echo ran > /out/ran; sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    clave.log.write_text("")
    clave("start", cid)
    clave("delete", "--force", cid)
    reap(pid)
    assert (bundle.out / "ran").exists()
    assert not (clave.root / cid).exists()
    entries = [json.loads(line) for line in clave.log.read_text().splitlines()]
    warnings = [e for e in entries if e["level"] == "warning"]
    assert any(kind in e["msg"] for e in warnings), entries
    assert not [e for e in entries if e["level"] == "error"]


def test_missing_hook_binary(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None], tmp_path: Path) -> None:
    bundle.config["hooks"] = {"createRuntime": [{"path": str(tmp_path / "no-such-hook")}]}
    bundle.write()
    assert "createRuntime" in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()
    assert not os.path.exists(tmp_path / "no-such-hook")


def test_hook_environment_is_exactly_env(clave: Clave, bundle: Bundle) -> None:
    out = bundle.out / "env"
    bundle.config["hooks"] = {"createRuntime": [
        {"path": "/usr/bin/env", "args": ["env"], "env": ["ONLY=this"]},
        {"path": "/bin/sh", "args": ["sh", "-c", f"env > {out}"], "env": ["A=1", "B=two words"]},
    ]}
    clave.create(clave.id())
    lines = set(out.read_text().splitlines())
    assert {line for line in lines if not line.startswith(("PWD=", "OLDPWD="))} == {"A=1", "B=two words"}
