"""Process identities are validated as runc validates them: every uid and gid a config or `exec` names is in
0-2147483647, refused at create (or exec) otherwise, with one line naming the field and nothing left behind.

The bug this guards against: 4294967295 is -1 to setresuid/setresgid ("leave unchanged"), so a container that
asked for that "unprivileged" user ran as the runtime's root. Each case runs Debian's runc the same way and
requires the same outcome (accepted with that identity, or refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from security.harness import Runner

VALUES = [0, 1000, 2147483647, 2147483648, 4294967295, 4294967296, -1]
ACCEPTED = {0, 1000, 2147483647}
FIELDS = ["uid", "gid", "additionalGids"]


def _with_identity(config: dict[str, Any], field: str, value: int) -> dict[str, Any]:
    user = config["process"]["user"] = {"uid": 1000, "gid": 1000}
    if field == "additionalGids":
        user["additionalGids"] = [value]
    else:
        user[field] = value
    return config


def _ids(out: str) -> tuple[int, int, list[int]]:
    """(uid, gid, groups) from `id -u; id -g; id -G` (which lists the primary group among the groups)."""
    uid, gid, groups = out.splitlines()
    return int(uid), int(gid), sorted({int(g) for g in groups.split()})


def _expected(field: str, value: int) -> tuple[int, int, list[int]]:
    gid = value if field == "gid" else 1000
    return value if field == "uid" else 1000, gid, sorted({gid, value} if field == "additionalGids" else {gid})


def _needs_runc() -> None:
    if subprocess.run(["runc", "--version"], capture_output=True).returncode != 0:
        pytest.skip("runc (the reference) is not installed")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", VALUES)
def test_run_identity_matches_runc(runner: Runner, field: str, value: int) -> None:
    _needs_runc()
    name = f"id-{field[:3].lower()}-{value & 0xFFFFFFFFFFF:x}"
    script = "id -u; id -g; id -G"
    reference = runner.reference_run(name, _with_identity(runner.config("sh", "-c", script), field, value))
    result = runner.run(name, _with_identity(runner.config("sh", "-c", script), field, value))
    if value in ACCEPTED:
        assert reference.returncode == 0, reference.stderr
        assert result.returncode == 0, result.stderr
        assert _ids(result.stdout) == _ids(reference.stdout) == _expected(field, value)
        return
    assert reference.returncode != 0, f"runc accepted {field}={value}"
    assert result.returncode != 0, f"clave ran {field}={value}: {result.stdout}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    path = f"process.user.{field}" + ("[0]" if field == "additionalGids" else "")
    assert path in lines[0] and "0-2147483647" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert runner.leftovers(name) == []


@pytest.mark.parametrize("value", [2147483648, 4294967295, 4294967296, -1])
@pytest.mark.parametrize("key", ["containerID", "hostID"])
def test_user_namespace_mapping_ids_are_validated(runner: Runner, key: str, value: int) -> None:
    config = runner.config("true")
    config["linux"]["namespaces"].append({"type": "user"})
    mapping = {"containerID": 0, "hostID": 100000, "size": 65536}
    mapping[key] = value
    config["linux"]["uidMappings"] = [mapping]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    bundle = runner.bundle("map", config)
    message = runner.create("map", bundle)
    assert f"linux.uidMappings[0].{key}" in message and "0-2147483647" in message, message
    assert len(message.splitlines()) == 1
    assert runner.leftovers("map") == []


@pytest.fixture
def running(runner: Runner) -> str:
    """A running container to exec into, with runc's twin beside it: ``<id>`` and ``<id>-runc``."""
    _needs_runc()
    config = runner.config("sleep", "300")
    bundle = runner.bundle("execid", config)
    assert runner.create("execid", bundle) == ""
    assert runner.clave("start", "execid").returncode == 0
    twin = runner.bundle("execid-runc", runner.config("sleep", "300"))
    # The container keeps runc's stdio: files, not pipes, or reading them would wait for the container.
    with open(twin / "runc.err", "w+") as err:
        code = subprocess.call(["runc", "--root", str(runner.base / "runc-state"), "run", "--detach", "--bundle",
                                str(twin), "execid-runc"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=err, timeout=30)
        err.seek(0)
        assert code == 0, err.read()
    return "execid"


@pytest.mark.parametrize("value", VALUES)
def test_exec_user_flag_matches_runc(runner: Runner, running: str, value: int) -> None:
    reference = runner.runc("exec", "--user", f"{value}:{value}", f"{running}-runc", "sh", "-c", "id -u; id -g")
    result = runner.clave("exec", "--user", f"{value}:{value}", running, "sh", "-c", "id -u; id -g")
    if value in ACCEPTED:
        assert reference.returncode == 0 and result.returncode == 0, (reference.stderr, result.stderr)
        assert result.stdout.split() == reference.stdout.split() == [str(value), str(value)]
        return
    if value == 2**32:
        # runc 1.1.5 casts --user to uint32: 2^32 wraps to 0 and its exec runs as root. Clave refuses it.
        assert reference.returncode != 0 or reference.stdout.split() == ["0", "0"], reference
    else:
        assert reference.returncode != 0, f"runc exec accepted --user {value}"
    assert result.returncode != 0, f"clave exec ran as {value}: {result.stdout}"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "process.user.uid" in result.stderr and "0-2147483647" in result.stderr
    _no_stray_processes(runner, running)


@pytest.mark.parametrize("value", VALUES)
def test_exec_process_file_matches_runc(runner: Runner, running: str, value: int, tmp_path: Path) -> None:
    process = runner.config("sh", "-c", "id -u; id -g; id -G")["process"]
    process["user"] = {"uid": 1000, "gid": value, "additionalGids": [1000]}
    process_file = tmp_path / "process.json"
    process_file.write_text(json.dumps(process))
    reference = runner.runc("exec", "--process", str(process_file), f"{running}-runc")
    result = runner.clave("exec", "--process", str(process_file), running)
    if value in ACCEPTED:
        assert reference.returncode == 0 and result.returncode == 0, (reference.stderr, result.stderr)
        assert _ids(result.stdout) == _ids(reference.stdout) == (1000, value, sorted({1000, value}))
        return
    assert reference.returncode != 0
    assert result.returncode != 0, f"clave exec ran with gid {value}: {result.stdout}"
    line = result.stderr.strip()
    assert str(process_file) in line and "process.user.gid" in line and "\n" not in line, line
    _no_stray_processes(runner, running)


def _no_stray_processes(runner: Runner, container_id: str) -> None:
    """Only the container's own sleep remains: a refused exec started nothing."""
    from security.harness import processes_in_cgroup

    deadline = time.monotonic() + 2
    while len(processes_in_cgroup(f"/{runner.group}/{container_id}")) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(processes_in_cgroup(f"/{runner.group}/{container_id}")) == 1


def test_identity_is_verified_before_exec() -> None:
    """The second line of defence: holding any identity other than the one asked for stops the process."""
    from clave.linux.process import ProcessError, check_identity

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a root process "asked" for 1000:1000 but never switched: the check must refuse
        os.close(read)
        try:
            check_identity(1000, 1000, [])
            os.write(write, b"passed")
        except ProcessError as exc:
            os.write(write, str(exc).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(child, 0)
    assert "identity check failed" in message and "uid 1000" in message
