"""Signing and measuring WebAssembly enclave modules: the library, the runtime's refusal, and `clave enclave`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wasmtime")

import _wasm_modules as wat  # noqa: E402

from clave.cli.main import run as clave  # noqa: E402
from clave.enclave.runtime import EnclaveError  # noqa: E402
from clave.enclave.wasm import measure, signing  # noqa: E402
from clave.enclave.wasm.runtime import WasmRuntime  # noqa: E402

MODULE = "/app/main.wasm"
UNLIMITED: dict[str, int | None] = {"memory_limit": None, "cpu_time_limit": None}


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLAVE_WASM_SIGNERS", str(tmp_path / "no-signer-policy"))
    return wat.install(tmp_path / "rootfs", MODULE, wat.hello(), wat.make_key(tmp_path))


def prepare(tmp_path: Path, allowed: frozenset[str] | None = None) -> WasmRuntime:
    runtime = WasmRuntime(str(tmp_path / "cache"), str(tmp_path / "platform.pem"), allowed_signers=allowed)
    runtime.prepare(str(tmp_path / "rootfs"), {"process": {"args": [MODULE]}})
    return runtime


def public_der(key_path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = signing.load_private_key(str(key_path))
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_signed_module_loads_with_its_signer_as_mrsigner(tmp_path: Path, module: Path) -> None:
    identity = prepare(tmp_path).measurement()
    assert identity["mrsigner"] == hashlib.sha256(public_der(tmp_path / "signer.pem")).hexdigest()
    document = json.loads(Path(str(module) + ".sig").read_text())
    assert document["mrenclave"] == identity["mrenclave"] and document["enclave_config"] == UNLIMITED


def test_one_flipped_byte_in_the_module_is_refused(tmp_path: Path, module: Path) -> None:
    data = bytearray(module.read_bytes())
    data[-1] ^= 0x01
    module.write_bytes(bytes(data))
    with pytest.raises(EnclaveError, match=r"^wasm: refused: /app/main.wasm does not match its signature .*modified"):
        prepare(tmp_path)


def test_missing_signature_is_refused(tmp_path: Path, module: Path) -> None:
    Path(str(module) + ".sig").unlink()
    with pytest.raises(EnclaveError, match=r"^wasm: refused: /app/main.wasm is not signed \(no main.wasm.sig\)"):
        prepare(tmp_path)


def test_tampered_signature_documents_are_refused(tmp_path: Path, module: Path) -> None:
    sig = Path(str(module) + ".sig")
    original = json.loads(sig.read_text())
    other = wat.make_key(tmp_path, "other.pem")
    other_public = signing.load_private_key(str(other)).public_key()  # type: ignore[attr-defined]
    from cryptography.hazmat.primitives import serialization

    swapped_key = other_public.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    flipped_signature = bytes([int(original["signature"][:2], 16) ^ 1]).hex() + original["signature"][2:]
    cases = {
        "does not verify": {"public_key": swapped_key},  # another key, the old signature
        "does not verify: the signature was modified": {"signature": flipped_signature},
        "its mrenclave does not match": {"enclave_config": {"memory_limit": 1 << 20, "cpu_time_limit": None}},
        "malformed": {"format": "something-else/1"},
    }
    for expected, change in cases.items():
        sig.write_text(json.dumps({**original, **change}))
        with pytest.raises(EnclaveError, match=expected):
            prepare(tmp_path)
    sig.write_text("{not json")
    with pytest.raises(EnclaveError, match="malformed"):
        prepare(tmp_path)


def test_a_signer_outside_the_policy_is_refused(tmp_path: Path, module: Path) -> None:
    mine = hashlib.sha256(public_der(tmp_path / "signer.pem")).hexdigest()
    prepare(tmp_path, allowed=frozenset({mine}))
    signing.sign_module(str(module), str(wat.make_key(tmp_path, "other.pem")))
    with pytest.raises(EnclaveError, match="which is not an allowed signer"):
        prepare(tmp_path, allowed=frozenset({mine}))
    policy = tmp_path / "signers"
    policy.write_text(f"# allowed signers\n{mine}  # the release key\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLAVE_WASM_SIGNERS", str(policy))
        with pytest.raises(EnclaveError, match="not an allowed signer"):
            prepare(tmp_path)


def test_measurement_changes_with_the_module_and_with_the_config() -> None:
    one = measure.module_digest(b"\0asm\1\0\0\0")
    two = measure.module_digest(b"\0asm\1\0\0\0\0")
    limited = {"memory_limit": 1 << 20, "cpu_time_limit": None}
    values = {measure.mrenclave(one, UNLIMITED), measure.mrenclave(two, UNLIMITED), measure.mrenclave(one, limited),
              measure.mrenclave(one, {"memory_limit": None, "cpu_time_limit": 5})}
    assert len(values) == 4
    resources = {"memory": {"limit": 1 << 20}, "cpu": {"quota": 5000, "period": 100000}}
    rlimits = [{"type": "RLIMIT_CPU", "soft": 5, "hard": 6}]
    process = {"args": ["x"], "env": ["A=1"], "rlimits": rlimits}
    oci: dict[str, Any] = {"linux": {"resources": resources}, "process": process}
    assert measure.enclave_config(oci) == {"memory_limit": 1 << 20, "cpu_time_limit": 5}
    # args, env and the CPU rate are not part of the identity
    assert measure.enclave_config({**oci, "process": {"rlimits": oci["process"]["rlimits"]}}) == \
        measure.enclave_config(oci)
    with pytest.raises(ValueError):
        measure.mrenclave(one, {"memory_limit": -1, "cpu_time_limit": None})


def test_cli_keygen_sign_measure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key.pem"
    module = wat.install(tmp_path, "m.wasm", wat.hello(), key=None)
    assert clave(["enclave", "keygen", "--out", str(key)]) == 0
    mrsigner = json.loads(capsys.readouterr().out)["mrsigner"]
    assert key.stat().st_mode & 0o777 == 0o600
    assert clave(["enclave", "keygen", "--out", str(key)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err

    assert clave(["enclave", "measure", str(module)]) == 0
    unsigned = json.loads(capsys.readouterr().out)
    assert unsigned["mrsigner"] is None

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"linux": {"resources": {"memory": {"limit": 4 << 20}}}}))
    assert clave(["enclave", "sign", "--key", str(key), "--config", str(config), str(module)]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert Path(signed["sig"]).exists() and signed["mrsigner"] == mrsigner
    assert signed["mrenclave"] != unsigned["mrenclave"]

    assert clave(["enclave", "measure", str(module)]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured == {"mrenclave": signed["mrenclave"], "mrsigner": mrsigner,
                        "enclave_config": {"memory_limit": 4 << 20, "cpu_time_limit": None}}
    assert clave(["enclave", "measure", "--config", str(config), str(module)]) == 0
    assert json.loads(capsys.readouterr().out)["mrenclave"] == signed["mrenclave"]

    module.write_bytes(module.read_bytes() + b"\0")
    assert clave(["enclave", "measure", str(module)]) == 1
    assert "the module was modified" in capsys.readouterr().err
    assert clave(["enclave", "frobnicate"]) == 1
    assert clave(["enclave", "sign", str(module)]) == 1
