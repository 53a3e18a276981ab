"""RA-TLS certificates: the written format, each verification layer, legacy reading, real SGX evidence."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clave.attestation import ratls
from clave.attestation.attesters.sample import DEFAULT_MEASUREMENT, SampleAttester
from clave.attestation.base import Attester, Collateral, Evidence, Layer, VerificationError, VerifyContext
from clave.attestation.policy import Policy

NONCE = bytes(range(100, 132))
TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "attestation"
SGX_SAMPLE = "dcapqvl_00a067110000"
DAY, YEAR = _dt.timedelta(days=1), _dt.timedelta(days=365)


def evidence_extension(cert: x509.Certificate, oid: str = ratls.TCG_DICE_TAGGED_EVIDENCE_OID) -> bytes:
    value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def layer_of(cert: x509.Certificate | bytes, **kwargs: object) -> Layer:
    with pytest.raises(VerificationError) as excinfo:
        ratls.verify_certificate(cert, **kwargs)  # type: ignore[arg-type]
    return excinfo.value.layer


def test_written_format_is_tcg_dice_tagged_evidence() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE)
    cert = issued.certificate
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("2.23.133.5.4.9"))
    assert not ext.critical
    assert cert.issuer == cert.subject
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    tagged = cbor2.loads(evidence_extension(cert))
    assert tagged.tag == ratls.TAG_SAMPLE
    evidence, claims = tagged.value
    assert evidence == issued.evidence.data and issued.evidence.insecure
    decoded = cbor2.loads(claims)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cbor2.loads(decoded["pubkey-hash"]) == [1, hashlib.sha256(spki).digest()]
    assert decoded["nonce"] == NONCE
    report_data = hashlib.sha256(claims).digest() + bytes(32)
    assert report_data.hex() in evidence.hex()  # the sample evidence carries the report data verbatim


def test_round_trip_accepts_and_reports_claims() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE)
    policy = Policy(reference_values={"measurement": (DEFAULT_MEASUREMENT.hex(),)})
    for form in (issued.certificate, issued.der, issued.cert_pem()):
        peer = ratls.verify_certificate(form, policy=policy, nonce=NONCE)
        assert (peer.tee, peer.format, peer.nonce, peer.insecure) == ("sample", "tcg-dice", NONCE, True)
        assert peer.claims["measurement"] == DEFAULT_MEASUREMENT.hex()
        assert peer.certificate_der == issued.der
    assert any("INSECURE" in w for w in peer.warnings)
    unchecked = ratls.verify_certificate(issued.der)
    assert any("replay" in w for w in unchecked.warnings)


def test_other_key_types_are_accepted() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    for key in (ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()):
        issued = ratls.create_certificate(SampleAttester(), nonce=NONCE, key=key)
        assert ratls.verify_certificate(issued.der, nonce=NONCE).tee == "sample"


def test_wrong_or_missing_nonce_is_a_freshness_failure() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE)
    assert layer_of(issued.der, nonce=bytes(32)) is Layer.FRESHNESS
    no_nonce = ratls.create_certificate(SampleAttester())
    assert layer_of(no_nonce.der, nonce=NONCE) is Layer.FRESHNESS


def test_expired_certificate_is_a_freshness_failure() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE, validity=_dt.timedelta(minutes=1))
    later = VerifyContext(now=_dt.datetime.now(_dt.UTC) + _dt.timedelta(hours=1))
    assert layer_of(issued.der, nonce=NONCE, ctx=later) is Layer.FRESHNESS


def test_certificate_key_not_named_by_evidence_is_a_key_binding_failure() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE)
    other = ratls.build_certificate(
        ratls.generate_key(), {ratls.TCG_DICE_TAGGED_EVIDENCE_OID: evidence_extension(issued.certificate)}
    )
    assert layer_of(other, nonce=NONCE) is Layer.KEY_BINDING


def test_claims_not_bound_by_evidence_are_a_key_binding_failure() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE)
    evidence = issued.evidence.data
    swapped_claims = ratls.encode_claims(ratls.spki_der(issued.private_key), bytes(32))
    value = cbor2.dumps(cbor2.CBORTag(ratls.TAG_SAMPLE, [evidence, swapped_claims]))
    forged = ratls.build_certificate(issued.private_key, {ratls.TCG_DICE_TAGGED_EVIDENCE_OID: value})
    assert layer_of(forged, nonce=bytes(32)) is Layer.KEY_BINDING


def test_bare_pubkey_hash_array_is_read_too() -> None:
    key = ratls.generate_key()
    claims = cbor2.dumps({"pubkey-hash": [1, hashlib.sha256(ratls.spki_der(key)).digest()], "nonce": NONCE})
    evidence = SampleAttester().attest(ratls.report_data_for_claims(claims)).data
    value = cbor2.dumps(cbor2.CBORTag(ratls.TAG_SAMPLE, [evidence, claims]))
    cert = ratls.build_certificate(key, {ratls.TCG_DICE_TAGGED_EVIDENCE_OID: value})
    assert ratls.verify_certificate(cert, nonce=NONCE).nonce == NONCE


def test_tampered_evidence_and_certificate_signature() -> None:
    issued = ratls.create_certificate(SampleAttester(), nonce=NONCE)
    tagged = cbor2.loads(evidence_extension(issued.certificate))
    evidence, claims = tagged.value
    flipped = evidence[:20] + bytes([evidence[20] ^ 1]) + evidence[21:]
    value = cbor2.dumps(cbor2.CBORTag(ratls.TAG_SAMPLE, [flipped, claims]))
    cert = ratls.build_certificate(issued.private_key, {ratls.TCG_DICE_TAGGED_EVIDENCE_OID: value})
    assert layer_of(cert, nonce=NONCE) in (Layer.SIGNATURE, Layer.FORMAT)
    der = bytearray(issued.der)
    der[-3] ^= 0x01  # inside the ECDSA signature value
    assert layer_of(bytes(der), nonce=NONCE) in (Layer.SIGNATURE, Layer.FORMAT)


def test_policy_applies_to_certificates() -> None:
    issued = ratls.create_certificate(SampleAttester(measurement=bytes(32)), nonce=NONCE)
    policy = Policy(reference_values={"measurement": (DEFAULT_MEASUREMENT.hex(),)})
    with pytest.raises(VerificationError, match="measurement") as excinfo:
        ratls.verify_certificate(issued.der, policy=policy, nonce=NONCE)
    assert excinfo.value.layer is Layer.POLICY


@pytest.mark.parametrize(
    "extensions, message",
    [
        ({}, "no attestation evidence extension"),
        ({"1.2.840.113741.1337.2": b"epid"}, "EPID"),
        ({"1.2.840.113741.1337.14": b"report"}, "local report"),
        ({ratls.TCG_DICE_TAGGED_EVIDENCE_OID: b"\xff\x00"}, "not CBOR"),
        ({ratls.TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps([b"a", b"b"])}, "not a tagged"),
        ({ratls.TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps(cbor2.CBORTag(60002, [b"r", b"c"]))}, "local report"),
        ({ratls.TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps(cbor2.CBORTag(0x1A7506, [b"r", b"c"]))}, "CSV"),
        ({ratls.TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps(cbor2.CBORTag(0x1A7599, [b"r", b"c"]))}, "unknown"),
        ({ratls.TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps(cbor2.CBORTag(ratls.TAG_SAMPLE, [b"x"]))}, "claims"),
    ],
)
def test_unusable_extensions_are_format_failures(extensions: dict[str, bytes], message: str) -> None:
    cert = ratls.build_certificate(ratls.generate_key(), extensions)
    with pytest.raises(VerificationError, match=message) as excinfo:
        ratls.verify_certificate(cert)
    assert excinfo.value.layer is Layer.FORMAT


def test_tags_and_quote_header_sniffing() -> None:
    assert ratls.tag_of_tee("sgx") == ratls.tag_of_tee("tdx_ecdsa") == 60000
    assert ratls.tag_of_tee("snp") == 0x1A7504
    assert ratls.quote_tee(bytes.fromhex("0300020000000000")) == "sgx"
    assert ratls.quote_tee(bytes.fromhex("0400020081000000")) == "tdx"
    with pytest.raises(VerificationError, match="EPID"):
        ratls.quote_tee(bytes.fromhex("0200000000000000"))
    with pytest.raises(ValueError):
        ratls.tag_of_tee("sev")


# ---- real SGX evidence (needs the Intel DCAP verifier and the shared test data) ----


class RecordedAttester(Attester):
    """Replays recorded hardware evidence: its report data is not ours, so binding must fail."""

    name = tee = "sgx"

    def __init__(self, quote: bytes) -> None:
        self.quote = quote

    def attest(self, report_data: bytes) -> Evidence:
        return Evidence(tee="sgx", data=self.quote)


@pytest.fixture
def sgx_sample(tmp_path: Path) -> tuple[bytes, Path, _dt.datetime]:
    pytest.importorskip("clave.attestation.verifiers.intel_dcap")
    directory = TESTDATA / "sgx"
    if not (directory / f"{SGX_SAMPLE}.quote.bin").is_file():
        pytest.skip(f"shared SGX test data absent from {directory}")
    manifest = {m["name"]: m for m in json.loads((directory / "manifest.json").read_text())}
    for path in directory.glob(f"{SGX_SAMPLE}.*"):
        shutil.copy(path, tmp_path / path.name.removeprefix(f"{SGX_SAMPLE}."))
    now = _dt.datetime.fromisoformat(manifest[SGX_SAMPLE]["validity"]["suggested_now"])
    return (directory / f"{SGX_SAMPLE}.quote.bin").read_bytes(), tmp_path, now


def test_real_sgx_quote_in_dice_certificate_verifies_then_fails_binding(
    sgx_sample: tuple[bytes, Path, _dt.datetime],
) -> None:
    quote, collateral, now = sgx_sample
    issued = ratls.create_certificate(RecordedAttester(quote), nonce=NONCE, not_before=now - DAY, validity=2 * DAY)
    assert cbor2.loads(evidence_extension(issued.certificate)).tag == 60000
    assert ratls.peek_tee(issued.der) == "sgx"
    ctx = VerifyContext(now=now, collateral=Collateral(collateral))
    with pytest.raises(VerificationError) as excinfo:
        ratls.verify_certificate(issued.der, nonce=NONCE, ctx=ctx)
    assert excinfo.value.layer is Layer.KEY_BINDING


def test_endorsements_extension_feeds_the_collateral(sgx_sample: tuple[bytes, Path, _dt.datetime]) -> None:
    quote, collateral, now = sgx_sample
    issued = ratls.create_certificate(
        RecordedAttester(quote),
        nonce=NONCE,
        endorsements=Collateral(collateral),
        not_before=now - DAY,
        validity=2 * YEAR,
    )
    endorsements = cbor2.loads(evidence_extension(issued.certificate, ratls.TCG_DICE_ENDORSEMENT_OID))
    assert endorsements.tag == 60000 and len(endorsements.value) == 8
    assert endorsements.value[1] == (collateral / "tcb_info.json").read_bytes()
    # Only the endorsements carry collateral here: expired collateral (a year later) proves they are read.
    a_year_later = VerifyContext(now=now + YEAR)
    assert layer_of(issued.der, nonce=NONCE, ctx=a_year_later) is Layer.COLLATERAL
    in_window = VerifyContext(now=now)
    assert layer_of(issued.der, nonce=NONCE, ctx=in_window) is Layer.KEY_BINDING


def test_legacy_gramine_certificate_is_read(sgx_sample: tuple[bytes, Path, _dt.datetime]) -> None:
    quote, collateral, now = sgx_sample
    cert = ratls.build_certificate(
        ratls.generate_key(), {ratls.LEGACY_SGX_ECDSA_QUOTE_OID: quote}, not_before=now - DAY, validity=2 * DAY
    )
    assert ratls.peek_tee(cert) == "sgx"
    ctx = VerifyContext(now=now, collateral=Collateral(collateral))
    # The quote verifies, but its report data is not SHA-256 of this certificate's key.
    with pytest.raises(VerificationError, match="report data") as excinfo:
        ratls.verify_certificate(cert, ctx=ctx)
    assert excinfo.value.layer is Layer.KEY_BINDING
