"""TPM 2.0 attestation: the real GCP Shielded VM quote, its mutations, and live quotes from swtpm."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import flip as _flip  # noqa: E402
from helpers import swtpm_fixture

from clave.attestation import registry
from clave.attestation import tpm_wire as wire
from clave.attestation.attesters import tpm as tpm_attester
from clave.attestation.attesters.tpm import Tcti, TpmAttester
from clave.attestation.base import AttesterUnavailable, Collateral, Layer, VerificationError, VerifyContext
from clave.attestation.verifiers.tpm import TpmVerifier, evidence_from_parts

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "attestation" / "tpm"
GCP = "gcp_shielded_vm_windows"


# ---------------------------------------------------------------- the real GCP quote


@dataclass(frozen=True)
class GcpSample:
    attest: bytes
    signature: bytes
    ak_public: bytes
    pcrs: dict[str, str]
    expected: dict[str, Any]

    def evidence(self) -> bytes:
        return evidence_from_parts(self.attest, self.signature, self.ak_public, self.pcrs, bank="sha1")


@pytest.fixture(scope="module")
def gcp() -> GcpSample:
    if not (SAMPLES / "manifest.json").is_file():
        pytest.skip(f"shared TPM test data absent ({SAMPLES})")
    sample = next(s for s in json.loads((SAMPLES / "manifest.json").read_text()) if s["name"] == GCP)
    files = {role: (SAMPLES / name).read_bytes() for role, name in sample["files"].items()}
    return GcpSample(files["quote"], files["signature"], files["ak_public"], json.loads(files["pcrs"]),
                     sample["expected"])




def test_gcp_quote_verifies_to_manifest_values(gcp: GcpSample) -> None:
    expected = gcp.expected["tpms_attest"]
    result = TpmVerifier().verify(gcp.evidence(), VerifyContext(nonce=b""))
    claims = result.as_json()

    assert result.tee == "tpm"
    assert claims["pcr_bank"] == "sha1"
    assert claims["pcrs"] == {str(i): gcp.pcrs[str(i)] for i in range(24)}
    assert list(claims["pcrs"]) == [str(i) for i in expected["pcr_select"][0]["pcrs"]]
    assert claims["nonce"] == expected["extra_data"] == ""
    assert claims["qualified_signer"] == expected["qualified_signer"]
    assert claims["clock"] == expected["clock"]
    assert claims["reset_count"] == expected["reset_count"]
    assert claims["restart_count"] == expected["restart_count"]
    assert claims["safe"] is (expected["safe"] == 1)
    assert "0x" + claims["firmware_version"] == expected["firmware_version"]
    assert claims["signature_scheme"] == "rsassa-sha1"
    assert claims["ak_public_sha256"] == hashlib.sha256(gcp.ak_public).hexdigest()
    assert claims["ak_name"].startswith("000b") and len(claims["ak_name"]) == 68
    # No AK certificate: the result says the AK is not endorsed.
    assert claims["ak_endorsed"] is False
    assert any("not bound to a genuine TPM" in w for w in result.warnings)
    json.dumps(claims)  # JSON-ready


def test_gcp_evidence_is_recognised(gcp: GcpSample) -> None:
    verifier = TpmVerifier()
    assert verifier.matches(gcp.evidence())
    assert not verifier.matches(b"")
    assert not verifier.matches(gcp.attest)
    assert not verifier.matches(b'{"format": "clave-tpm-quote/1"}')
    assert isinstance(registry.verifier("tpm"), TpmVerifier)


def _without_restricted_bit(ak_public: bytes) -> bytes:
    attributes = int.from_bytes(ak_public[4:8], "big") & ~wire.ATTR_RESTRICTED
    return ak_public[:4] + attributes.to_bytes(4, "big") + ak_public[8:]


GCP_MUTATIONS: dict[str, tuple[Callable[[GcpSample], GcpSample], Layer, str]] = {
    "flipped bit in clock": (lambda g: replace(g, attest=_flip(g.attest, 0x30)), Layer.SIGNATURE,
                             "does not verify"),
    "flipped bit in pcr digest": (lambda g: replace(g, attest=_flip(g.attest, 0x60, 7)), Layer.SIGNATURE,
                                  "does not verify"),
    "flipped bit in magic": (lambda g: replace(g, attest=_flip(g.attest, 0)), Layer.FORMAT, "magic"),
    "truncated attest": (lambda g: replace(g, attest=g.attest[:-1]), Layer.FORMAT, "truncated"),
    "flipped bit in signature": (lambda g: replace(g, signature=_flip(g.signature, 100)), Layer.SIGNATURE,
                                 "does not verify"),
    "flipped bit in AK modulus": (lambda g: replace(g, ak_public=_flip(g.ak_public, 200)), Layer.SIGNATURE,
                                  "does not verify"),
    "AK not restricted": (lambda g: replace(g, ak_public=_without_restricted_bit(g.ak_public)),
                          Layer.SIGNATURE, "restricted"),
    "wrong PCR value": (lambda g: replace(g, pcrs=g.pcrs | {"7": "00" * 20}), Layer.SIGNATURE, "PCR digest"),
    "missing PCR value": (lambda g: replace(g, pcrs={k: v for k, v in g.pcrs.items() if k != "23"}),
                          Layer.FORMAT, "no value for quoted PCR sha1:23"),
}


@pytest.mark.parametrize("mutation", list(GCP_MUTATIONS))
def test_gcp_mutation_rejected(gcp: GcpSample, mutation: str) -> None:
    mutate, layer, reason = GCP_MUTATIONS[mutation]
    with pytest.raises(VerificationError) as err:
        TpmVerifier().verify(mutate(gcp).evidence(), VerifyContext())
    assert err.value.layer is layer
    assert reason in str(err.value)


def test_gcp_event_log_replays_to_quoted_pcrs(gcp: GcpSample) -> None:
    log = (SAMPLES / f"{GCP}.eventlog.bin").read_bytes()
    evidence = evidence_from_parts(gcp.attest, gcp.signature, gcp.ak_public, gcp.pcrs, event_log=log)
    claims = TpmVerifier().verify(evidence, VerifyContext()).claims
    assert claims["event_log_pcrs"] == [0, 4, 5, 7, 11, 12, 13, 14]

    tampered = _flip(log, 8)  # the first event's SHA-1 digest (PCR 0)
    evidence = evidence_from_parts(gcp.attest, gcp.signature, gcp.ak_public, gcp.pcrs, event_log=tampered)
    with pytest.raises(VerificationError, match="does not replay to quoted PCR sha1:0") as err:
        TpmVerifier().verify(evidence, VerifyContext())
    assert err.value.layer is Layer.SIGNATURE

    evidence = evidence_from_parts(gcp.attest, gcp.signature, gcp.ak_public, gcp.pcrs, event_log=log[:-3])
    with pytest.raises(VerificationError, match="truncated") as err:
        TpmVerifier().verify(evidence, VerifyContext())
    assert err.value.layer is Layer.FORMAT


def test_gcp_wrong_nonce_and_report_data_rejected(gcp: GcpSample) -> None:
    evidence = gcp.evidence()
    with pytest.raises(VerificationError) as err:
        TpmVerifier().verify(evidence, VerifyContext(nonce=b"\x01" * 16))
    assert err.value.layer is Layer.FRESHNESS
    with pytest.raises(VerificationError) as err:
        TpmVerifier().verify(evidence, VerifyContext(expected_report_data=b"\x02" * 64))
    assert err.value.layer is Layer.KEY_BINDING


def test_malformed_containers_rejected_as_format() -> None:
    for blob in (b"", b"\xa1\x00", wire.TpmEvidence(b"x", b"y", b"z", {"sha256": {}}).encode()):
        with pytest.raises(VerificationError) as err:
            TpmVerifier().verify(blob, VerifyContext())
        assert err.value.layer is Layer.FORMAT


def test_qualifying_data_rule() -> None:
    assert wire.qualifying_data(b"a" * 32) == b"a" * 32
    assert wire.qualifying_data(b"a" * 33) == hashlib.sha256(b"a" * 33).digest()
    assert wire.qualifying_data(b"") == b""


def test_tcti_parsing() -> None:
    assert Tcti.parse("swtpm:host=10.0.0.2,port=2400") == Tcti("swtpm", host="10.0.0.2", port=2400)
    assert Tcti.parse("swtpm:port=2400") == Tcti("swtpm", port=2400)
    assert Tcti.parse("device:/dev/tpm0") == Tcti("device", path="/dev/tpm0")
    for bad in ("mssim:port=1", "swtpm:port=x", "swtpm:hots=a"):
        with pytest.raises(ValueError):
            Tcti.parse(bad)


def test_attester_unavailable_without_tpm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLAVE_TPM_TCTI", raising=False)
    monkeypatch.setattr(tpm_attester, "DEFAULT_DEVICE", str(tmp_path / "tpmrm0"))
    with pytest.raises(AttesterUnavailable, match="CLAVE_TPM_TCTI is not set"):
        TpmAttester(state_dir=tmp_path).available()
    with pytest.raises(AttesterUnavailable, match="not reachable"):
        TpmAttester(tcti=f"swtpm:host=127.0.0.1,port={_free_port()}", state_dir=tmp_path).available()
    with pytest.raises(AttesterUnavailable, match="unsupported TCTI"):
        TpmAttester(tcti="tabrmd", state_dir=tmp_path).available()


# ---------------------------------------------------------------- live quotes from swtpm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


swtpm = swtpm_fixture("module")


@pytest.fixture(scope="module")
def attester(swtpm: str, tmp_path_factory: pytest.TempPathFactory) -> TpmAttester:
    return TpmAttester(tcti=swtpm, state_dir=tmp_path_factory.mktemp("clave-tpm"))


def test_live_quote_verifies(attester: TpmAttester) -> None:
    attester.available()
    report_data = hashlib.sha512(b"tls public key").digest()
    evidence = attester.attest(report_data)
    assert evidence.tee == "tpm" and evidence.insecure  # swtpm is a software TPM

    verifier = registry.verifier_for(evidence.data)
    assert isinstance(verifier, TpmVerifier)
    nonce = wire.qualifying_data(report_data)
    ctx = VerifyContext(expected_report_data=report_data, nonce=report_data)
    result = verifier.verify(evidence.data, ctx)
    claims = result.as_json()
    assert claims["pcr_bank"] == "sha256"
    assert sorted(claims["pcrs"], key=int) == [str(i) for i in range(8)]
    assert all(len(v) == 64 for v in claims["pcrs"].values())
    assert claims["nonce"] == nonce.hex() == hashlib.sha256(report_data).hexdigest()
    assert claims["signature_scheme"] == "ecdsa-sha256"
    assert claims["ak_endorsed"] is False


def test_live_short_report_data_is_used_as_is(attester: TpmAttester) -> None:
    evidence = attester.attest(b"0123456789abcdef")
    claims = TpmVerifier().verify(evidence.data, VerifyContext(nonce=b"0123456789abcdef")).claims
    assert claims["nonce"] == b"0123456789abcdef".hex()
    with pytest.raises(VerificationError) as err:
        TpmVerifier().verify(evidence.data, VerifyContext(nonce=b"0123456789abcdeF"))
    assert err.value.layer is Layer.FRESHNESS
    with pytest.raises(VerificationError) as err:
        TpmVerifier().verify(evidence.data, VerifyContext(expected_report_data=b"other"))
    assert err.value.layer is Layer.KEY_BINDING


@pytest.mark.parametrize("ak_type, scheme", [("rsassa", "rsassa-sha256"), ("rsapss", "rsapss-sha256")])
def test_live_rsa_quotes_verify(swtpm: str, tmp_path: Path, ak_type: str, scheme: str) -> None:
    evidence = TpmAttester(tcti=swtpm, state_dir=tmp_path, ak_type=ak_type).attest(b"n" * 32)
    claims = TpmVerifier().verify(evidence.data, VerifyContext(nonce=b"n" * 32)).claims
    assert claims["signature_scheme"] == scheme


def test_live_ak_is_persisted_and_reused(swtpm: str, tmp_path: Path) -> None:
    def ak_name(state_dir: Path) -> str:
        evidence = TpmAttester(tcti=swtpm, state_dir=state_dir).attest(b"r")
        return str(TpmVerifier().verify(evidence.data, VerifyContext()).claims["ak_name"])

    first = ak_name(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"ak-ecc.priv", "ak-ecc.pub"}
    assert ak_name(tmp_path) == first  # reused by a new attester instance
    (tmp_path / "ak-ecc.priv").write_bytes(b"\x00\x03abc")  # damaged blob: a new AK replaces it
    replaced = ak_name(tmp_path)
    assert replaced != first
    assert ak_name(tmp_path) == replaced


def test_live_quote_follows_pcr_extension(attester: TpmAttester, swtpm: str) -> None:
    if shutil.which("tpm2_pcrextend") is None:
        pytest.skip("tpm2-tools is not installed")
    before = TpmVerifier().verify(attester.attest(b"a").data, VerifyContext()).claims["pcrs"]
    measurement = hashlib.sha256(b"clave test measurement").digest()
    done = subprocess.run(["tpm2_pcrextend", f"7:sha256={measurement.hex()}"], capture_output=True, text=True,
                          env={"TPM2TOOLS_TCTI": swtpm, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    after = TpmVerifier().verify(attester.attest(b"b").data, VerifyContext()).claims["pcrs"]
    assert after["7"] == hashlib.sha256(bytes.fromhex(before["7"]) + measurement).hexdigest()
    assert {k: v for k, v in after.items() if k != "7"} == {k: v for k, v in before.items() if k != "7"}


def _tpm2_tools(swtpm: str, *args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True,
                          env={"TPM2TOOLS_TCTI": swtpm, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, f"{args[0]}: {done.stderr}"


def test_interoperates_with_tpm2_tools(attester: TpmAttester, swtpm: str, tmp_path: Path) -> None:
    if shutil.which("tpm2_quote") is None:
        pytest.skip("tpm2-tools is not installed")
    evidence = wire.TpmEvidence.decode(attester.attest(b"interop").data)
    ak_pub, ak_priv = attester.state_dir / "ak-ecc.pub", attester.state_dir / "ak-ecc.priv"
    (tmp_path / "attest").write_bytes(evidence.attest)
    (tmp_path / "sig").write_bytes(evidence.signature)
    # Our quote passes tpm2_checkquote...
    _tpm2_tools(swtpm, "tpm2_checkquote", "-u", str(ak_pub), "-m", str(tmp_path / "attest"),
                "-s", str(tmp_path / "sig"), "-g", "sha256", "-q", b"interop".hex())
    # ...and tpm2-tools can quote with our persisted AK, whose evidence we verify. Without a resource
    # manager tpm2-tools leaves objects loaded, so flush after each step.
    srk, ak = str(tmp_path / "srk.ctx"), str(tmp_path / "ak.ctx")
    _tpm2_tools(swtpm, "tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb", "-c", srk,
                "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt")
    _tpm2_tools(swtpm, "tpm2_flushcontext", "-t")
    _tpm2_tools(swtpm, "tpm2_load", "-Q", "-C", srk, "-u", str(ak_pub), "-r", str(ak_priv), "-c", ak)
    _tpm2_tools(swtpm, "tpm2_flushcontext", "-t")
    _tpm2_tools(swtpm, "tpm2_quote", "-Q", "-c", ak, "-l", "sha256:0,1,2,3,4,5,6,7", "-q", "c0ffee",
                "-m", str(tmp_path / "q.attest"), "-s", str(tmp_path / "q.sig"))
    _tpm2_tools(swtpm, "tpm2_flushcontext", "-t")

    tools_evidence = evidence_from_parts((tmp_path / "q.attest").read_bytes(), (tmp_path / "q.sig").read_bytes(),
                                         ak_pub.read_bytes(), evidence.pcrs["sha256"])
    claims = TpmVerifier().verify(tools_evidence, VerifyContext(nonce=bytes.fromhex("c0ffee"))).claims
    assert claims["ak_name"] == TpmVerifier().verify(evidence.encode(), VerifyContext()).claims["ak_name"]


def test_live_mutations_rejected(attester: TpmAttester) -> None:
    ev = wire.TpmEvidence.decode(attester.attest(b"m").data)
    cases = {
        Layer.SIGNATURE: [
            wire.TpmEvidence(_flip(ev.attest, 40), ev.signature, ev.ak_public, ev.pcrs),
            wire.TpmEvidence(ev.attest, _flip(ev.signature, 10), ev.ak_public, ev.pcrs),
            wire.TpmEvidence(ev.attest, ev.signature, ev.ak_public,
                             {"sha256": ev.pcrs["sha256"] | {0: b"\x01" * 32}}),
        ],
        Layer.FORMAT: [wire.TpmEvidence(ev.attest, ev.signature, ev.ak_public, {"sha1": ev.pcrs["sha256"]})],
    }
    for layer, mutants in cases.items():
        for mutant in mutants:
            with pytest.raises(VerificationError) as err:
                TpmVerifier().verify(mutant.encode(), VerifyContext())
            assert err.value.layer is layer


# ---------------------------------------------------------------- AK certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _ak_cert(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], ak_public: bytes) -> bytes:
    ca_cert, ca_key = ca
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("clave test AK")).issuer_name(ca_cert.subject)
            .public_key(wire.parse_public(ak_public).key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_ak_certificate_endorses_the_ak(attester: TpmAttester) -> None:
    ev = wire.TpmEvidence.decode(attester.attest(b"c").data)
    ca, other_ca = _ca("clave test TPM CA"), _ca("some other CA")
    ev.ak_certificate = _ak_cert(ca, ev.ak_public)
    evidence = ev.encode()
    anchors = Collateral(tpm_roots__pem=ca[0].public_bytes(serialization.Encoding.PEM))

    result = TpmVerifier().verify(evidence, VerifyContext(collateral=anchors))
    assert result.claims["ak_endorsed"] is True and result.warnings == []

    unanchored = TpmVerifier().verify(evidence, VerifyContext())
    assert unanchored.claims["ak_endorsed"] is False
    assert any("no TPM trust anchor" in w for w in unanchored.warnings)

    wrong_anchor = Collateral(tpm_roots__pem=other_ca[0].public_bytes(serialization.Encoding.PEM))
    with pytest.raises(VerificationError, match="does not chain") as err:
        TpmVerifier().verify(evidence, VerifyContext(collateral=wrong_anchor))
    assert err.value.layer is Layer.CHAIN

    with pytest.raises(VerificationError, match="not valid at") as err:
        TpmVerifier().verify(evidence, VerifyContext(collateral=anchors,
                                                     now=dt.datetime.now(dt.UTC) + dt.timedelta(days=10)))
    assert err.value.layer is Layer.CHAIN

    other_key = wire.TpmEvidence.decode(TpmAttester(tcti=attester.tcti_spec, state_dir=attester.state_dir,
                                                    ak_type="rsassa").attest(b"c").data).ak_public
    ev.ak_certificate = _ak_cert(ca, other_key)
    with pytest.raises(VerificationError, match="different key") as err:
        TpmVerifier().verify(ev.encode(), VerifyContext(collateral=anchors))
    assert err.value.layer is Layer.CHAIN


# ---------------------------------------------------------------- crypto-agile event log against a live quote


def _agile_log(events: list[tuple[int, bytes]], algorithms: dict[int, int]) -> bytes:
    """A TCG crypto-agile event log: Spec ID Event03 header, then one EV_ACTION event per (PCR, digest)."""
    spec = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
    spec += b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms.items()) + b"\0"
    log = struct.pack("<II20sI", 0, wire.EV_NO_ACTION, bytes(20), len(spec)) + spec
    for pcr, digest in events:
        data = b"clave test event"
        log += struct.pack("<IIIH", pcr, 0x80000007, 1, wire.ALG_SHA256) + digest
        log += struct.pack("<I", len(data)) + data
    return log


def test_live_quote_with_crypto_agile_event_log(attester: TpmAttester, swtpm: str) -> None:
    if shutil.which("tpm2_pcrextend") is None:
        pytest.skip("tpm2-tools is not installed")
    events = [(4, hashlib.sha256(b"boot loader").digest()), (5, hashlib.sha256(b"gpt").digest()),
              (4, hashlib.sha256(b"kernel").digest())]
    for pcr, digest in events:
        done = subprocess.run(["tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}"], capture_output=True,
                              text=True, env={"TPM2TOOLS_TCTI": swtpm, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
    ev = wire.TpmEvidence.decode(attester.attest(b"log").data)

    ev.event_log = _agile_log(events, {wire.ALG_SHA256: 32})
    claims = TpmVerifier().verify(ev.encode(), VerifyContext()).claims
    assert claims["event_log_pcrs"] == [4, 5]

    ev.event_log = _agile_log(events[:2], {wire.ALG_SHA256: 32})  # a measurement left out
    with pytest.raises(VerificationError, match="does not replay to quoted PCR sha256:4") as err:
        TpmVerifier().verify(ev.encode(), VerifyContext())
    assert err.value.layer is Layer.SIGNATURE

    ev.event_log = _agile_log([], {wire.ALG_SHA1: 20})
    result = TpmVerifier().verify(ev.encode(), VerifyContext())
    assert result.claims["event_log_pcrs"] == []
    assert any("no sha256 digests" in w for w in result.warnings)
