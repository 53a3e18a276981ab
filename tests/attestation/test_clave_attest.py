"""`clave attest`: evidence and RA-TLS certificates from the CLI, checked by `clave-verify`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def clave(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "clave"), *args], capture_output=True, text=True, timeout=60)


def verify(*args: str) -> tuple[int, dict]:
    result = subprocess.run([str(BIN / "clave-verify"), *args, "--json"], capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


def test_json_evidence_binds_the_nonce(tmp_path: Path) -> None:
    result = clave("attest", "--attester", "sample", "--nonce", "00112233")
    assert result.returncode == 0, result.stderr
    assert "INSECURE" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["tee"] == "sample" and doc["insecure"] is True
    import base64
    import hashlib

    assert doc["report_data"] == hashlib.sha256(bytes.fromhex("00112233")).hexdigest()
    evidence = tmp_path / "evidence.bin"
    evidence.write_bytes(base64.b64decode(doc["evidence"]))
    code, verdict = verify("evidence", str(evidence), "--tee", "sample")
    assert code == 0 and verdict["verdict"] == "accepted"
    assert verdict["claims"]["report_data"].startswith(doc["report_data"])


def test_certificate_checks_out_only_with_its_nonce(tmp_path: Path) -> None:
    out = tmp_path / "cert.pem"
    result = clave("attest", "--attester", "sample", "--format", "cert", "--nonce", "cafe", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "BEGIN CERTIFICATE" in text and "PRIVATE KEY" in text
    assert out.stat().st_mode & 0o077 == 0  # the key is private
    code, verdict = verify("cert", str(out), "--nonce", "cafe")
    assert code == 0 and verdict["verdict"] == "accepted"
    code, verdict = verify("cert", str(out), "--nonce", "beef")
    assert code == 1 and verdict["verdict"] == "rejected" and verdict["layer"] == "freshness"


def test_unavailable_attester_is_a_clear_error() -> None:
    result = clave("attest", "--attester", "snp")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sev-guest" in lines[0]


def test_bad_nonce_is_a_usage_error() -> None:
    result = clave("attest", "--attester", "sample", "--nonce", "xyz")
    assert result.returncode == 1 and "--nonce must be hex" in result.stderr
