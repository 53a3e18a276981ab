"""The CLI surface real callers use: list, spec, features, --version, --log/--log-format, ids."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import CLAVE, Bundle, Clave


def test_list_json_and_table(clave: Clave, bundle: Bundle) -> None:
    assert json.loads(clave("list", "--format", "json").stdout) is None  # runc prints null
    bundle.args("sleep", "60")
    first, second = clave.id("a"), clave.id("b")
    clave.create(first)
    clave.create(second)
    clave("start", second)
    listed = json.loads(clave("list", "--format", "json").stdout)
    assert [c["id"] for c in listed] == [first, second]
    assert [c["status"] for c in listed] == ["created", "running"]
    for entry in listed:
        assert {"ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner"} <= set(entry)
        assert entry["bundle"] == str(bundle.path)
    table = clave("list").stdout.decode().splitlines()
    assert table[0].split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[first][2] == "created" and rows[second][2] == "running"
    assert clave("list", "-q").stdout.decode().split() == [first, second]
    assert "format" in clave.fail("list", "--format", "xml")


def test_list_without_root_dir(clave: Clave) -> None:
    assert not clave.root.exists()
    assert json.loads(clave("list", "--format", "json").stdout) is None  # runc prints null


def test_spec_writes_config_and_refuses_to_overwrite(clave: Clave, tmp_path: Path) -> None:
    target = tmp_path / "specdir"
    target.mkdir()
    clave("spec", "--bundle", str(target))
    config = json.loads((target / "config.json").read_text())
    from clave.config import spec as oci

    oci.validate(config)
    assert config["process"]["terminal"] is True
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert {n["type"] for n in config["linux"]["namespaces"]} >= {"pid", "network", "ipc", "uts", "mount"}
    before = (target / "config.json").read_bytes()
    assert "exists" in clave.fail("spec", "--bundle", str(target))
    assert (target / "config.json").read_bytes() == before
    rootless = tmp_path / "rootless"
    rootless.mkdir()
    clave("spec", "--rootless", "--bundle", str(rootless))
    config = json.loads((rootless / "config.json").read_text())
    assert "user" in {n["type"] for n in config["linux"]["namespaces"]} and config["linux"]["uidMappings"]


def test_features_shape(clave: Clave) -> None:
    features = json.loads(clave("features").stdout)
    assert re.match(r"^1\.\d+\.\d+$", features["ociVersionMin"])
    assert re.match(r"^1\.\d+\.\d+$", features["ociVersionMax"])
    assert set(features["hooks"]) == {"prestart", "createRuntime", "createContainer", "startContainer",
                                      "poststart", "poststop"}
    assert {"bind", "rbind", "ro", "nosuid", "rprivate"} <= set(features["mountOptions"])
    linux = features["linux"]
    assert {"pid", "network", "mount", "ipc", "uts", "user", "cgroup"} <= set(linux["namespaces"])
    assert "CAP_SYS_ADMIN" in linux["capabilities"]
    assert linux["cgroup"]["v1"] is True and linux["cgroup"]["v2"] is True
    assert {"enabled", "actions", "operators", "archs"} <= set(linux["seccomp"])
    assert "SCMP_ACT_ERRNO" in linux["seccomp"]["actions"]


def test_version() -> None:
    result = subprocess.run([CLAVE, "--version"], capture_output=True, text=True, check=True)
    assert re.match(r"^clave version \d+\.\d+", result.stdout)
    assert re.search(r"^spec: 1\.\d+\.\d+$", result.stdout, re.M)


def test_log_json_error_line(clave: Clave, tmp_path: Path) -> None:
    log = tmp_path / "other.json"
    result = subprocess.run([CLAVE, "--root", str(clave.root), "--log", str(log), "--log-format", "json",
                             "state", "nope"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "nope" in result.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[-1]["level"] == "error" and "nope" in lines[-1]["msg"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", lines[-1]["time"])


def test_log_text_format(clave: Clave, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    result = subprocess.run([CLAVE, "--root", str(clave.root), "--log", str(log), "state", "nope"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "level=error" in log.read_text() and "nope" in log.read_text()


def test_bad_global_flags(clave: Clave) -> None:
    result = subprocess.run([CLAVE, "--log-format", "xml", "list"], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "log format" in result.stderr
    result = subprocess.run([CLAVE, "--bogus", "list"], capture_output=True, text=True)
    assert result.returncode != 0 and "flag provided but not defined" in result.stderr
    assert "flag provided but not defined" in clave.fail("list", "--bogus")
    assert "unknown command" in clave.fail("frobnicate")


@pytest.mark.parametrize("bad_id", ["", "..", ".", "a/b", "../escape", "a b", "x\n"])
def test_invalid_ids(clave: Clave, bundle: Bundle, bad_id: str, assert_clean: object) -> None:
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), bad_id)
    assert "id" in message
    assert_clean()  # type: ignore[operator]
    assert not (clave.root.parent / "escape").exists()


def test_duplicate_id(clave: Clave, bundle: Bundle) -> None:
    bundle.args("sleep", "60")
    cid = clave.id()
    pid = clave.create(cid)
    state = clave.state(cid)
    assert "already exists" in clave.fail("create", "--bundle", str(bundle.path), cid)
    assert clave.state(cid) == state and state["pid"] == pid


def test_debug_flag_and_run_detach_terminal(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    assert json.loads(clave("--debug", "list", "--format", "json").stdout) is None
    bundle.process["terminal"] = True
    bundle.write()
    assert "console socket" in clave.fail("run", "--detach", "--bundle", str(bundle.path), clave.id())


def test_global_handler_flag(clave: Clave, bundle: Bundle) -> None:
    """--handler (Docker's runtimeArgs, podman's runtime options) picks the handler of new containers."""
    bundle.args("true")
    bundle.write()
    result = clave("--handler", "native", "run", "--bundle", str(bundle.path), clave.id("h1"), check=False)
    assert result.returncode == 0, result.stderr
    line = clave.fail("--handler", "nosuch", "run", "--bundle", str(bundle.path), clave.id("h2"))
    assert "unknown container handler 'nosuch'" in line
