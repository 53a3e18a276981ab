"""Evidence of the WebAssembly enclave runtime: local reports from the runtime and the attester, checked by the
wasm verifier against the host platform key (insecure: software only)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("wasmtime")

from clave.attestation import registry  # noqa: E402
from clave.attestation import wasm_report as report  # noqa: E402
from clave.attestation.base import AttesterUnavailable, Collateral, Layer, VerificationError, VerifyContext  # noqa: E402
from clave.attestation.verifiers.wasm import PLATFORM_KEY_ROLE, WasmVerifier  # noqa: E402
from clave.enclave.wasm import signing  # noqa: E402
from clave.enclave.wasm.attester import WasmAttester  # noqa: E402
from clave.enclave.wasm.runtime import WasmRuntime  # noqa: E402

# A minimal WASI command: `_start` returns at once.
MODULE_WAT = '(module (memory (export "memory") 1) (func (export "_start")))'
REPORT_DATA = bytes(range(64))


@pytest.fixture
def signed_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import wasmtime

    monkeypatch.setenv("CLAVE_WASM_SIGNERS", str(tmp_path / "no-signer-policy"))
    monkeypatch.setenv("CLAVE_WASM_PLATFORM_KEY", str(tmp_path / "platform.pem"))
    monkeypatch.delenv("CLAVE_WASM_TRUST_ON_FIRST_USE", raising=False)
    module = tmp_path / "rootfs" / "app.wasm"
    module.parent.mkdir()
    module.write_bytes(wasmtime.wat2wasm(MODULE_WAT))
    key = tmp_path / "signer.pem"
    signing.generate_key(str(key))
    signing.sign_module(str(module), str(key))
    return module


def platform_collateral(tmp_path: Path) -> Collateral:
    pem = report.platform_public_pem(report.load_platform_key(str(tmp_path / "platform.pem")))
    collateral = Collateral()
    collateral.set(PLATFORM_KEY_ROLE, pem)
    return collateral


def runtime_report(tmp_path: Path) -> tuple[bytes, dict[str, str]]:
    runtime = WasmRuntime(cache_dir=str(tmp_path / "cache"))
    runtime.prepare(str(tmp_path / "rootfs"), {"process": {"args": ["/app.wasm"]}})
    return runtime.local_report(b"", REPORT_DATA), runtime.measurement()


def test_runtime_report_verifies_against_the_platform_key(tmp_path: Path, signed_module: Path) -> None:
    evidence, identity = runtime_report(tmp_path)
    verifier = registry.verifier_for(evidence)
    assert isinstance(verifier, WasmVerifier)
    result = verifier.verify(evidence, VerifyContext(collateral=platform_collateral(tmp_path),
                                                     expected_report_data=REPORT_DATA, nonce=REPORT_DATA[:8]))
    assert result.insecure and result.tee == "wasm"
    assert result.claims == {**identity, "report_data": REPORT_DATA.hex(), "debug": False}
    assert any("INSECURE" in w for w in result.warnings)


def test_attester_reports_the_module_named_in_the_environment(tmp_path: Path, signed_module: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AttesterUnavailable, match="CLAVE_WASM_MODULE"):
        registry.attester("wasm")
    monkeypatch.setenv("CLAVE_WASM_MODULE", str(signed_module))
    attester = registry.attester("wasm")
    assert isinstance(attester, WasmAttester)
    evidence = attester.attest(b"nonce")
    assert evidence.insecure and evidence.tee == "wasm"
    claims = WasmVerifier().verify(evidence.data, VerifyContext(collateral=platform_collateral(tmp_path))).claims
    assert claims["mrenclave"] == runtime_report(tmp_path)[1]["mrenclave"]
    assert bytes.fromhex(claims["report_data"]) == b"nonce".ljust(64, b"\0")


def test_without_the_platform_key_only_explicit_trust_on_first_use_accepts(tmp_path: Path, signed_module: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    evidence, _ = runtime_report(tmp_path)
    with pytest.raises(VerificationError) as refused:
        WasmVerifier().verify(evidence, VerifyContext())
    assert refused.value.layer is Layer.COLLATERAL
    assert "trusted on first use" in " ".join(WasmVerifier(trust_on_first_use=True).verify(
        evidence, VerifyContext()).warnings)
    monkeypatch.setenv("CLAVE_WASM_TRUST_ON_FIRST_USE", "1")
    assert WasmVerifier().verify(evidence, VerifyContext()).insecure


def test_forged_and_tampered_reports_are_rejected(tmp_path: Path, signed_module: Path) -> None:
    evidence, identity = runtime_report(tmp_path)
    ctx = VerifyContext(collateral=platform_collateral(tmp_path))
    # another platform's key signs a report claiming the same identity
    forger = report.load_platform_key(str(tmp_path / "forger.pem"))
    forged = report.make_report(forger, bytes.fromhex(identity["mrenclave"]), bytes.fromhex(identity["mrsigner"]),
                                REPORT_DATA)
    cases: list[tuple[bytes, Layer]] = [
        (forged, Layer.SIGNATURE),
        (evidence[:-1] + bytes([evidence[-1] ^ 1]), Layer.SIGNATURE),  # signature
        (evidence[:40] + bytes([evidence[40] ^ 1]) + evidence[41:], Layer.SIGNATURE),  # body byte
        (evidence[:20], Layer.FORMAT),
        (report.MAGIC + b"\xff" * 80, Layer.FORMAT),
    ]
    for bad, layer in cases:
        with pytest.raises(VerificationError) as rejected:
            WasmVerifier().verify(bad, ctx)
        assert rejected.value.layer is layer, (bad[:16], str(rejected.value))
    with pytest.raises(VerificationError) as unbound:
        WasmVerifier().verify(evidence, VerifyContext(collateral=ctx.collateral, expected_report_data=b"other"))
    assert unbound.value.layer is Layer.KEY_BINDING
