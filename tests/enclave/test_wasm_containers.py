"""WebAssembly enclave containers through `clave`: signed modules run, tampered ones are refused with nothing
left behind, signals stop the guest, and `clave attest ID` returns evidence from the enclave's own runtime."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_clave

pytest.importorskip("wasmtime")
sys.path.insert(0, str(Path(__file__).parent))
import _wasm_modules as wat  # noqa: E402

from clave.config.defaults import default_spec  # noqa: E402

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root")


class Bundle:
    def __init__(self, base: Path) -> None:
        self.path = base / "bundle"
        self.rootfs = self.path / "rootfs"
        self.rootfs.mkdir(parents=True)
        self.root = base / "state"
        self.key = wat.make_key(base)

    def write(self, guest_path: str, *, memory: int | None = None) -> None:
        config = default_spec()
        config["process"].update(terminal=False, args=[guest_path])
        config["process"]["env"].append("ENCLAVE_TYPE=wasm")
        config["root"] = {"path": "rootfs", "readonly": True}
        if memory:
            config["linux"]["resources"]["memory"] = {"limit": memory}
        (self.path / "config.json").write_text(json.dumps(config))

    def clave(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_clave(*args, root=self.root, cwd=self.path)

    def assert_clean(self) -> None:
        assert not self.root.exists() or os.listdir(self.root) == []


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[Bundle]:
    b = Bundle(tmp_path)
    yield b
    if b.root.exists():
        for cid in os.listdir(b.root):
            b.clave("delete", "--force", cid)


def test_signed_module_runs_with_its_exit_status(bundle: Bundle) -> None:
    wat.install(bundle.rootfs, "/app/hello.wasm", wat.hello("hi from wasm\n"), bundle.key)
    bundle.write("/app/hello.wasm")
    result = bundle.clave("run", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi from wasm\n"
    assert "INSECURE" in result.stderr
    wat.install(bundle.rootfs, "/app/exit.wasm", wat.exit_with(42), bundle.key)
    bundle.write("/app/exit.wasm")
    assert bundle.clave("run", "exit").returncode == 42
    bundle.assert_clean()


def test_tampered_and_unsigned_modules_are_refused(bundle: Bundle) -> None:
    module = wat.install(bundle.rootfs, "/app/hello.wasm", wat.hello(), bundle.key)
    data = bytearray(module.read_bytes())
    data[-1] ^= 1
    module.write_bytes(bytes(data))
    bundle.write("/app/hello.wasm")
    result = bundle.clave("run", "tampered")
    assert result.returncode != 0
    assert "does not match its signature" in result.stderr
    bundle.assert_clean()
    wat.install(bundle.rootfs, "/app/unsigned.wasm", wat.hello(), None)
    bundle.write("/app/unsigned.wasm")
    result = bundle.clave("run", "unsigned")
    assert result.returncode != 0 and "sig" in result.stderr
    bundle.assert_clean()


def test_signal_stops_the_guest_and_attest_gives_evidence(bundle: Bundle) -> None:
    wat.install(bundle.rootfs, "/app/spin.wasm", wat.spin(), bundle.key)
    bundle.write("/app/spin.wasm")
    assert bundle.clave("run", "--detach", "spin").returncode == 0
    state = json.loads(bundle.clave("state", "spin").stdout)
    assert state["status"] == "running" and state["enclave"] == {"type": "wasm", "insecure": True}
    result = bundle.clave("attest", "spin", "--nonce", "c0ffee")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["tee"] == "wasm" and doc["report_data"] == hashlib.sha256(bytes.fromhex("c0ffee")).hexdigest()
    measure = json.loads(bundle.clave("enclave", "measure", str(bundle.rootfs / "app/spin.wasm")).stdout)
    assert doc["measurement"]["mrenclave"] == measure["mrenclave"]
    evidence = bundle.path / "evidence.bin"
    evidence.write_bytes(base64.b64decode(doc["evidence"]))
    verdict = subprocess.run([str(BIN / "clave-verify"), "evidence", str(evidence), "--tee", "wasm", "--json"],
                             capture_output=True, text=True, env={**os.environ, "CLAVE_WASM_TRUST_ON_FIRST_USE": "1"})
    claims = json.loads(verdict.stdout)["claims"]
    assert claims["mrenclave"] == measure["mrenclave"]
    assert claims["report_data"].startswith(doc["report_data"])
    assert bundle.clave("kill", "spin", "TERM").returncode == 0
    deadline = time.monotonic() + 10
    while json.loads(bundle.clave("state", "spin").stdout)["status"] != "stopped":
        assert time.monotonic() < deadline, "the guest did not stop on SIGTERM"
        time.sleep(0.05)
    assert bundle.clave("delete", "spin").returncode == 0
    bundle.assert_clean()


def test_native_containers_cannot_be_attested(bundle: Bundle) -> None:
    result = bundle.clave("attest", "nosuch", "--nonce", "00")
    assert result.returncode == 1 and "does not exist" in result.stderr
