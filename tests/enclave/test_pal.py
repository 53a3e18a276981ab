"""Enclave containers through the Enclave Runtime PAL API, end to end: the skeleton PAL (v1, v2, v3, compiled
here with gcc) records every call, so the ABI, the call order, rune's settings and signal forwarding are all
checked through `clave run` / `create` / `start` / `kill` / `delete`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_clave

from clave.tools.bundles import make_bundle, make_busybox_rootfs

CLAVE = str(Path(sys.executable).with_name("clave"))
SKELETON = Path(__file__).with_name("skeleton_pal.c")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the skeleton PAL"),
]


@pytest.fixture(scope="module")
def pal_dir() -> Iterator[Path]:
    """Skeleton PALs v1-v3 in a root-owned 0755 directory (PAL paths must not be writable by others)."""
    directory = Path(tempfile.mkdtemp(prefix="clave-pal-"))
    directory.chmod(0o755)
    for version in (1, 2, 3):
        subprocess.run(["gcc", "-Wall", "-Werror", "-shared", "-fPIC", f"-DPAL_API_VERSION={version}",
                        "-o", str(directory / f"liberpal-skeleton-v{version}.so"), str(SKELETON)], check=True)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="clave-enclave-rootfs-"))
    make_busybox_rootfs(str(base / "rootfs"))
    yield base / "rootfs"
    shutil.rmtree(base)


class Env:
    def __init__(self, tmp: Path, rootfs: Path) -> None:
        self.root = tmp / "state"
        self.bundle = tmp / "bundle"
        self.rootfs = rootfs
        self.log = rootfs / "tmp" / f"pal-{os.getpid()}-{tmp.name}.log"

    def config(self, args: list[str], pal: Path | None, *, enclave_type: str = "software",
               via: str = "env", extra_args: str = "") -> dict:
        config = make_bundle(str(self.bundle), args, rootfs=str(self.rootfs))
        settings = {"type": enclave_type, "args": f"log=/tmp/{self.log.name}{extra_args}", "path": str(pal or "")}
        if via == "env":
            config["process"]["env"] += [f"ENCLAVE_TYPE={settings['type']}", f"ENCLAVE_RUNTIME_ARGS={settings['args']}"]
            if pal is not None:
                config["process"]["env"].append(f"ENCLAVE_RUNTIME_PATH={settings['path']}")
        else:
            config["annotations"] = {"enclave.type": settings["type"], "enclave.runtime.args": settings["args"],
                                     "enclave.runtime.path": settings["path"]}
        self.write(config)
        return config

    def write(self, config: dict) -> None:
        (self.bundle / "config.json").write_text(json.dumps(config))

    def clave(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_clave(*args, root=self.root, timeout=30)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def assert_clean(self) -> None:
        assert not self.root.exists() or os.listdir(self.root) == [], os.listdir(self.root)


@pytest.fixture
def env(tmp_path: Path, rootfs: Path) -> Iterator[Env]:
    e = Env(tmp_path, rootfs)
    yield e
    if e.root.exists():
        for cid in os.listdir(e.root):
            e.clave("delete", "--force", cid)
    e.log.unlink(missing_ok=True)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_run_drives_the_pal_in_order(env: Env, pal_dir: Path, version: int) -> None:
    env.config(["/bin/sh", "-c", "echo app says hi; echo ENCLAVE=${ENCLAVE_TYPE:-unset} FOO=$FOO; exit 4"],
               pal_dir / f"liberpal-skeleton-v{version}.so")
    cfg = json.loads((env.bundle / "config.json").read_text())
    cfg["process"]["env"].append("FOO=bar")
    env.write(cfg)
    result = env.clave("run", "--bundle", str(env.bundle), f"pal{version}")
    assert result.returncode == 4, result.stderr
    assert "app says hi" in result.stdout
    # rune's rule: the ENCLAVE_* settings are taken out of the container's environment.
    assert "ENCLAVE=unset" in result.stdout
    assert "INSECURE" in result.stderr  # a software enclave is marked insecure in the log
    calls = [c for c in env.calls() if not c.startswith("  ")]
    assert calls[0].startswith(f"pal_init version={version} args=log=/tmp/")
    assert " log_level=info" in calls[0]
    if version == 1:
        assert calls[1].startswith("pal_exec path=/bin/sh stdio=0,1,2")
    else:
        assert calls[1].startswith("pal_create_process path=/bin/sh stdio=0,1,2")
        assert calls[2] == "pal_exec pid=42"  # the pid pal_create_process returned, read at offset 0
    assert "pal_exec done exit_value=4" in calls  # written through the pointer at offset 8
    assert calls[-1] == "pal_destroy"
    details = env.calls()
    assert "  argv=/bin/sh|-c|" + "echo app says hi; echo ENCLAVE=${ENCLAVE_TYPE:-unset} FOO=$FOO; exit 4" in details
    if version >= 2:
        env_line = next(c for c in details if c.startswith("  env="))
        assert "FOO=bar" in env_line and "ENCLAVE_" not in env_line
    if version == 3:
        assert "  fd=-1 addr=0" in details
    env.assert_clean()


def test_settings_from_annotations_and_args_commas(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/true"], pal_dir / "liberpal-skeleton-v2.so", via="annotations", extra_args=",debug,x=1")
    result = env.clave("run", "--bundle", str(env.bundle), "annotated")
    assert result.returncode == 0, result.stderr
    assert env.calls()[0].startswith(f"pal_init version=2 args=log=/tmp/{env.log.name} debug x=1")


def test_lifecycle_state_marks_insecure_and_signals_are_forwarded(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/sleep", "30"], pal_dir / "liberpal-skeleton-v2.so")
    assert env.clave("create", "--bundle", str(env.bundle), "sig").returncode == 0
    state = json.loads(env.clave("state", "sig").stdout)
    assert state["status"] == "created"
    assert state["enclave"] == {"type": "software", "insecure": True}
    assert env.calls() == []  # pal_init runs only once the container starts
    assert env.clave("start", "sig").returncode == 0
    deadline = time.monotonic() + 5
    while "pal_exec pid=42" not in env.calls() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert env.clave("kill", "sig", "TERM").returncode == 0
    while json.loads(env.clave("state", "sig").stdout)["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.02)
    calls = env.calls()
    assert "pal_kill pid=-1 sig=15" in calls
    assert "pal_exec done exit_value=143" in calls
    assert calls[-1] == "pal_destroy"
    assert env.clave("delete", "sig").returncode == 0
    env.assert_clean()


def test_pal_init_failure_is_a_clear_error(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/true"], pal_dir / "liberpal-skeleton-v3.so", extra_args=",fail_init")
    result = env.clave("run", "--bundle", str(env.bundle), "badinit")
    assert result.returncode != 0
    assert "pal_init: Invalid argument" in result.stderr
    env.assert_clean()


def test_pal_exec_failure_is_a_clear_error(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/true"], pal_dir / "liberpal-skeleton-v2.so", extra_args=",fail_exec")
    result = env.clave("run", "--bundle", str(env.bundle), "badexec")
    assert result.returncode != 0
    assert "pal_exec: Exec format error" in result.stderr


def _hostile_paths(pal_dir: Path, tmp: Path) -> list[tuple[str, str]]:
    good = pal_dir / "liberpal-skeleton-v2.so"
    link = tmp / "link.so"
    link.symlink_to(good)
    writable = tmp / "writable.so"
    shutil.copy(good, writable)
    writable.chmod(0o666)
    text = tmp / "notelf.so"
    text.write_text("#!/bin/sh\n")
    text.chmod(0o755)
    return [
        ("relative/liberpal.so", "absolute"),
        (str(pal_dir / ".." / pal_dir.name / good.name), "normalised"),
        (str(tmp / "missing.so"), "No such file"),
        (str(link), "not a regular file"),
        (str(writable), "not writable by group/others"),
        (str(text), "not an ELF shared object"),
        ("", "is not set"),
    ]


def test_hostile_pal_paths_are_refused_and_leave_nothing(env: Env, pal_dir: Path, tmp_path: Path) -> None:
    for path, reason in _hostile_paths(pal_dir, tmp_path):
        config = env.config(["/bin/true"], None)
        config["process"]["env"].append(f"ENCLAVE_RUNTIME_PATH={path}")
        env.write(config)
        result = env.clave("create", "--bundle", str(env.bundle), "hostile")
        assert result.returncode != 0, path
        assert reason in result.stderr, (path, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        env.assert_clean()
    assert stat.S_IMODE(os.stat(pal_dir).st_mode) == 0o755


@pytest.mark.skipif(any(os.path.exists(d) for d in ("/dev/sgx_enclave", "/dev/sgx/enclave", "/dev/isgx")),
                    reason="this host has SGX")
def test_intel_sgx_without_sgx_fails_clearly(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/true"], pal_dir / "liberpal-skeleton-v2.so", enclave_type="intelSgx")
    result = env.clave("create", "--bundle", str(env.bundle), "sgx")
    assert result.returncode != 0
    assert "no SGX here" in result.stderr
    env.assert_clean()


def test_unknown_enclave_type(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/true"], pal_dir / "liberpal-skeleton-v2.so", enclave_type="quantum")
    result = env.clave("create", "--bundle", str(env.bundle), "quantum")
    assert result.returncode != 0
    assert "unknown enclave type 'quantum'" in result.stderr
    env.assert_clean()


def test_without_enclave_type_it_is_a_native_container(env: Env) -> None:
    make_bundle(str(env.bundle), ["/bin/sh", "-c", "echo native"], rootfs=str(env.rootfs))
    result = env.clave("run", "--bundle", str(env.bundle), "native")
    assert result.returncode == 0 and result.stdout.strip() == "native"
    assert "INSECURE" not in result.stderr


def _wait_for_call(env: Env, call: str) -> None:
    deadline = time.monotonic() + 5
    while call not in env.calls():
        assert time.monotonic() < deadline, f"no {call!r} in {env.calls()}"
        time.sleep(0.02)


def test_exec_creates_a_new_enclave_process(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/sleep", "30"], pal_dir / "liberpal-skeleton-v2.so")
    assert env.clave("run", "--detach", "--bundle", str(env.bundle), "ex").returncode == 0
    _wait_for_call(env, "pal_exec pid=42")
    result = env.clave("exec", "ex", "/bin/sh", "-c", "echo from exec; exit 6")
    assert result.returncode == 6, result.stderr
    assert result.stdout.strip() == "from exec"
    calls = env.calls()
    assert "pal_exec pid=43" in calls and "pal_exec done exit_value=6" in calls
    # Detached: the pid file names a proxy that stands for the enclave process and relays signals to it.
    pid_file = env.bundle / "exec.pid"
    assert env.clave("exec", "--detach", "--pid-file", str(pid_file), "ex", "/bin/sleep", "30").returncode == 0
    proxy = int(pid_file.read_text())
    _wait_for_call(env, "pal_exec pid=44")
    os.kill(proxy, 15)
    _wait_for_call(env, "pal_kill pid=44 sig=15")
    _wait_for_call(env, "pal_exec done exit_value=143")
    assert env.clave("kill", "ex", "KILL").returncode == 0


def test_exec_into_a_v1_enclave_is_refused(env: Env, pal_dir: Path) -> None:
    env.config(["/bin/sleep", "30"], pal_dir / "liberpal-skeleton-v1.so")
    assert env.clave("run", "--detach", "--bundle", str(env.bundle), "ex1").returncode == 0
    _wait_for_call(env, "pal_exec path=/bin/sleep stdio=0,1,2")
    result = env.clave("exec", "ex1", "/bin/true")
    assert result.returncode != 0
    assert "PAL API v2 or later" in result.stderr
    assert env.clave("kill", "ex1", "KILL").returncode == 0


def test_v3_local_report_through_clave_attest(env: Env, pal_dir: Path) -> None:
    """pal_get_local_report (v3) reached through `clave attest ID`; the v3 call cannot carry report data, so a
    nonce is refused rather than silently dropped."""
    env.config(["/bin/sleep", "30"], pal_dir / "liberpal-skeleton-v3.so")
    assert env.clave("run", "--detach", "--bundle", str(env.bundle), "rep").returncode == 0
    _wait_for_call(env, "pal_exec pid=42")
    result = env.clave("attest", "rep", "--report-data", "00" * 32)
    assert result.returncode == 0, result.stderr
    import base64

    doc = json.loads(result.stdout)
    assert doc["tee"] == "pal" and doc["insecure"] is True
    assert base64.b64decode(doc["evidence"]).startswith(b"SKELETON-REPORT:")
    assert any(c.startswith("pal_get_local_report targetinfo_len=0") for c in env.calls())
    refused = env.clave("attest", "rep", "--nonce", "c0ffee")
    assert refused.returncode == 1 and "cannot bind a nonce" in refused.stderr
    assert env.clave("kill", "rep", "KILL").returncode == 0
