"""clave-verify as a subprocess: verdicts, exit codes, JSON shape; sample evidence and real hardware evidence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from clave.attestation import ratls
from clave.attestation.attesters.sample import DEFAULT_MEASUREMENT, SampleAttester

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "attestation"
NONCE = bytes(range(32))


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clave.attestation.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def verdict(*args: str | Path, exit_code: int) -> dict[str, Any]:
    result = run(*args, "--json")
    assert result.returncode == exit_code, result.stdout + result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def sample_evidence(tmp_path: Path) -> Path:
    path = tmp_path / "sample.bin"
    path.write_bytes(SampleAttester().attest(NONCE).data)
    return path


@pytest.fixture
def sample_cert(tmp_path: Path) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(ratls.create_certificate(SampleAttester(), nonce=NONCE).cert_pem())
    return path


def write_policy(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    return path


def test_sample_evidence_accepted_with_insecure_warning(sample_evidence: Path) -> None:
    result = run("evidence", sample_evidence, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["verdict"] == "accepted" and out["tee"] == "sample" and out["reason"] is None
    assert out["claims"]["measurement"] == DEFAULT_MEASUREMENT.hex()
    assert out["claims"]["report_data"] == (NONCE + bytes(32)).hex()
    assert out["insecure"] is True
    assert "INSECURE" in result.stderr
    assert any("pins no reference values" in w for w in out["warnings"])


def test_human_output(sample_evidence: Path) -> None:
    result = run("evidence", sample_evidence, "--tee", "sample")
    assert result.returncode == 0
    assert result.stdout.startswith("accepted: sample evidence")
    assert f'measurement: "{DEFAULT_MEASUREMENT.hex()}"' in result.stdout
    assert "warning: sample evidence is INSECURE" in result.stdout


def test_tampered_evidence_rejected_with_layer(sample_evidence: Path) -> None:
    data = bytearray(sample_evidence.read_bytes())
    data[30] ^= 0x40
    sample_evidence.write_bytes(bytes(data))
    out = verdict("evidence", sample_evidence, exit_code=1)
    assert out["verdict"] == "rejected" and out["claims"] == {}
    assert out["layer"] == "evidence signature" and out["reason"].startswith("evidence signature:")
    human = run("evidence", sample_evidence)
    assert human.returncode == 1 and human.stdout.startswith("rejected: evidence signature")


def test_nonce_checked(sample_evidence: Path) -> None:
    assert verdict("evidence", sample_evidence, "--nonce", NONCE.hex(), exit_code=0)["verdict"] == "accepted"
    out = verdict("evidence", sample_evidence, "--nonce", "ff" * 32, exit_code=1)
    assert out["layer"] == "freshness"


def test_policy_file_applied(sample_evidence: Path, tmp_path: Path) -> None:
    pinned = write_policy(tmp_path, {"reference_values": {"measurement": [DEFAULT_MEASUREMENT.hex()]}})
    out = verdict("evidence", sample_evidence, "--policy", pinned, exit_code=0)
    assert not any("pins no reference values" in w for w in out["warnings"])
    wrong = write_policy(tmp_path, {"reference_values": {"measurement": ["00" * 32]}})
    out = verdict("evidence", sample_evidence, "--policy", wrong, exit_code=1)
    assert out["layer"] == "policy" and "measurement" in out["reason"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--at", "yesterday"], "ISO-8601"),
        (["--nonce", "xyz"], "not hex"),
        (["--tee", "sev"], "invalid choice"),
        (["--collateral", "/nonexistent/dir"], "not a directory"),
        (["--roots", "/nonexistent/dir"], "not a directory"),
        (["--policy", "/nonexistent/policy.json"], "cannot read"),
    ],
)
def test_usage_errors_exit_2(sample_evidence: Path, extra: list[str], message: str) -> None:
    result = run("evidence", sample_evidence, *extra)
    assert result.returncode == 2 and message in result.stderr
    assert result.stdout == ""


def test_usage_errors_for_files_and_policy(tmp_path: Path) -> None:
    missing = run("evidence", tmp_path / "absent.bin")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert run().returncode == 2
    bad_policy = write_policy(tmp_path, {"allow_debug": "yes"})
    evidence = tmp_path / "e.bin"
    evidence.write_bytes(SampleAttester().attest(b"").data)
    result = run("evidence", evidence, "--policy", bad_policy)
    assert result.returncode == 2 and "allow_debug" in result.stderr


def test_unrecognised_evidence_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"definitely not evidence" * 10)
    out = verdict("evidence", junk, exit_code=1)
    assert out["layer"] == "evidence format" and out["tee"] is None


def test_cert_accepted_and_nonce_checked(sample_cert: Path, tmp_path: Path) -> None:
    out = verdict("cert", sample_cert, "--nonce", NONCE.hex(), exit_code=0)
    assert out["tee"] == "sample" and out["claims"]["ratls_nonce"] == NONCE.hex()
    assert out["insecure"] is True
    out = verdict("cert", sample_cert, "--nonce", "ab" * 32, exit_code=1)
    assert out["layer"] == "freshness" and out["tee"] == "sample"
    unchecked = verdict("cert", sample_cert, exit_code=0)
    assert any("replay" in w for w in unchecked["warnings"])
    der = tmp_path / "cert.der"
    der.write_bytes(ratls.load_certificate(sample_cert.read_bytes()).public_bytes(Encoding.DER))
    assert verdict("cert", der, "--nonce", NONCE.hex(), exit_code=0)["verdict"] == "accepted"


def test_cert_policy_and_garbage(sample_cert: Path, tmp_path: Path) -> None:
    wrong = write_policy(tmp_path, {"reference_values": {"measurement": ["00" * 32]}})
    out = verdict("cert", sample_cert, "--policy", wrong, exit_code=1)
    assert out["layer"] == "policy"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert verdict("cert", garbage, exit_code=1)["layer"] == "evidence format"


# ---- real hardware evidence: runs when the plugin and the shared test data are present ----


def staged(tmp_path: Path, tee_dir: str, sample: str) -> tuple[Path, Path, str, dict[str, Any]]:
    """(evidence file, collateral dir of role-named copies, suggested_now, manifest entry)."""
    directory = TESTDATA / tee_dir
    if not (directory / "manifest.json").is_file():
        pytest.skip(f"shared test data absent from {directory}")
    entry = {m["name"]: m for m in json.loads((directory / "manifest.json").read_text())}[sample]
    collateral = tmp_path / "collateral"
    collateral.mkdir()
    evidence = None
    for path in directory.glob(f"{sample}.*"):
        role = path.name.removeprefix(f"{sample}.")
        if role in ("quote.bin", "report.bin", "cose_sign1.cbor"):
            evidence = path
        else:
            shutil.copy(path, collateral / role)
    assert evidence is not None
    return evidence, collateral, entry["validity"]["suggested_now"], entry


def test_real_sgx_quote(tmp_path: Path) -> None:
    pytest.importorskip("clave.attestation.verifiers.intel_dcap")
    quote, collateral, now, entry = staged(tmp_path, "sgx", "dcapqvl_00a067110000")
    args = ("evidence", quote, "--collateral", collateral, "--at", now)
    out = verdict(*args, "--tee", "sgx", exit_code=0)
    assert out["tee"] == "sgx" and out["insecure"] is False
    assert out["claims"]["mrenclave"] == entry["expected"]["body"]["mr_enclave"]
    assert out["claims"]["mrsigner"] == entry["expected"]["body"]["mr_signer"]
    assert out["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert verdict(*args, exit_code=0)["tee"] == "sgx"  # --tee auto recognises it

    report_data = bytes.fromhex(out["claims"]["report_data"])
    assert verdict(*args, "--nonce", report_data[:13].hex(), exit_code=0)["verdict"] == "accepted"
    assert verdict(*args, "--nonce", "00" * 16, exit_code=1)["layer"] == "freshness"

    up_to_date_only = write_policy(tmp_path, {"allowed_tcb_status": ["UpToDate"]})
    out = verdict(*args, "--policy", up_to_date_only, exit_code=1)
    assert out["layer"] == "policy" and "ConfigurationAndSWHardeningNeeded" in out["reason"]
    mrenclave = entry["expected"]["body"]["mr_enclave"]
    pinned = write_policy(tmp_path, {"reference_values": {"mrenclave": [mrenclave.upper()]}})
    assert verdict(*args, "--policy", pinned, exit_code=0)["claims"]["mrenclave"] == mrenclave

    expired = verdict("evidence", quote, "--collateral", collateral, "--at", "2027-01-01T00:00:00Z", exit_code=1)
    assert expired["layer"] in ("collateral", "certificate chain")


def test_real_sgx_quote_with_wrong_roots(tmp_path: Path) -> None:
    pytest.importorskip("clave.attestation.verifiers.intel_dcap")
    quote, collateral, now, _ = staged(tmp_path, "sgx", "dcapqvl_00a067110000")
    roots = tmp_path / "roots"
    roots.mkdir()
    other_root = TESTDATA / "roots" / "aws_nitro_enclaves_root_g1.pem"
    if not other_root.is_file():
        pytest.skip("roots test data absent")
    shutil.copy(other_root, roots / "intel_sgx_root_ca.pem")  # a wrong anchor under Intel's name
    out = verdict("evidence", quote, "--collateral", collateral, "--at", now, "--roots", roots, exit_code=1)
    assert out["layer"] in ("certificate chain", "collateral")


def test_real_snp_report(tmp_path: Path) -> None:
    pytest.importorskip("clave.attestation.verifiers.amd_snp")
    report, collateral, now, entry = staged(tmp_path, "sev-snp", "virtee_milan_v2")
    out = verdict("evidence", report, "--collateral", collateral, "--at", now, "--tee", "snp", exit_code=0)
    assert out["tee"] == "snp" and out["claims"]["measurement"] == entry["expected"]["measurement"]


def test_real_nitro_document(tmp_path: Path) -> None:
    pytest.importorskip("clave.attestation.verifiers.aws_nitro")
    document, _collateral, now, entry = staged(tmp_path, "nitro", "anjuna_prod_2023")
    out = verdict("evidence", document, "--at", now, exit_code=0)
    assert out["tee"] == "nitro" and out["claims"]["module_id"] == entry["expected"]["module_id"]
