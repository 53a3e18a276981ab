"""AWS Nitro Enclaves: genuine documents verify to the manifest values; tampering fails at the right layer."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from helpers import flip  # noqa: E402

from clave.attestation.base import Layer, Roots, VerificationError, VerifyContext
from clave.attestation.verifiers.aws_nitro import PLUGINS, NitroVerifier, parse_document

DATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "attestation"
NITRO = DATA / "nitro"
ROOTS = DATA / "roots"

pytestmark = pytest.mark.skipif(not NITRO.is_dir(), reason=f"shared Nitro test data absent at {NITRO}")


def _samples() -> list[dict[str, Any]]:
    if not NITRO.is_dir():
        return []
    return list(json.loads((NITRO / "manifest.json").read_text()))


SAMPLES = {s["name"]: s for s in _samples()}


def document_of(name: str) -> bytes:
    return (NITRO / SAMPLES[name]["files"]["cose"]).read_bytes()


def ctx_for(name: str, **changes: Any) -> VerifyContext:
    ctx = VerifyContext(now=dt.datetime.fromisoformat(SAMPLES[name]["validity"]["suggested_now"]))
    for key, value in changes.items():
        setattr(ctx, key, value)
    return ctx




def rejected(evidence: bytes, ctx: VerifyContext) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        NitroVerifier().verify(evidence, ctx)
    return info.value


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_verifies_to_manifest_values(name: str) -> None:
    expected = SAMPLES[name]["expected"]
    result = NitroVerifier().verify(document_of(name), ctx_for(name))
    claims = result.claims
    assert result.tee == "nitro"
    assert claims["module_id"] == expected["module_id"]
    assert claims["timestamp"] == expected["timestamp"]
    assert claims["timestamp_ms"] == expected["timestamp_ms"]
    assert claims["digest"] == expected["digest"]
    for index, value in expected["pcrs_0_1_2_3_4_8"].items():
        assert claims[f"pcr{index}"] == value
    assert sorted(claims[f"pcr{i}"] for i in range(16))  # PCR0..PCR15 all present
    nonzero = [i for i in range(16) if int(claims[f"pcr{i}"], 16)]
    assert nonzero == expected["nonzero_pcr_indexes"]
    assert claims["debug"] is expected["debug_mode_pcr0_1_2_zero"]
    assert claims["user_data"] == expected["user_data_hex"]
    assert claims["nonce"] == expected["nonce_hex"]
    assert claims["public_key"] == expected["public_key_hex"]
    assert json.dumps(result.as_json())


def test_tagged_cose_sign1_verifies() -> None:
    name = "anjuna_prod_2023"
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(document_of(name))))
    assert NitroVerifier().matches(tagged)
    assert NitroVerifier().verify(tagged, ctx_for(name)).claims["module_id"].startswith("i-07ceff4b")


def test_matches_sniffs_documents_only() -> None:
    verifier = NitroVerifier()
    for name in SAMPLES:
        assert verifier.matches(document_of(name))
    assert not verifier.matches(b"")
    assert not verifier.matches(b"\x84garbage")
    report = next((DATA / "sev-snp").glob("*.report.bin"), None)
    if report is not None:
        assert not verifier.matches(report.read_bytes())


def test_plugin_contract() -> None:
    assert PLUGINS == (NitroVerifier,)
    assert (NitroVerifier.name, NitroVerifier.tee) == ("nitro", "nitro")


# -- mutations -------------------------------------------------------------------------------------------


def _offset_of_payload_field(evidence: bytes, value: bytes) -> int:
    offset = evidence.find(value)
    assert offset > 0
    return offset


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_flipped_bit_in_payload_is_rejected(name: str) -> None:
    evidence = document_of(name)
    expected = SAMPLES[name]["expected"]
    targets = [
        _offset_of_payload_field(evidence, bytes.fromhex(expected["pcrs_0_1_2_3_4_8"]["4"])) + 5,
        _offset_of_payload_field(evidence, expected["module_id"].encode()) + 3,  # stays valid UTF-8
        _offset_of_payload_field(evidence, parse_document(evidence).certificate) + 200,
    ]
    if expected["user_data_hex"]:
        targets.append(_offset_of_payload_field(evidence, bytes.fromhex(expected["user_data_hex"])))
    for offset in targets:
        error = rejected(flip(evidence, offset), ctx_for(name))
        assert error.layer is Layer.SIGNATURE, (offset, str(error))


def test_flipped_bit_in_protected_header_is_rejected() -> None:
    name = "anjuna_prod_2021a"
    evidence = document_of(name)
    protected = cbor2.loads(evidence)[0]
    start = evidence.find(protected)
    for offset in range(start, start + len(protected)):
        assert rejected(flip(evidence, offset), ctx_for(name)).layer in (Layer.FORMAT, Layer.SIGNATURE)
    # A protected header changed without touching the algorithm reaches the signature check.
    protected_header, unprotected, payload, signature = cbor2.loads(evidence)
    altered = cbor2.dumps({1: -35, 4: b"kid"})
    error = rejected(cbor2.dumps([altered, unprotected, payload, signature]), ctx_for(name))
    assert error.layer is Layer.SIGNATURE


@pytest.mark.parametrize("position", [0, 47, 48, 95])
def test_flipped_signature_bit_is_rejected(position: int) -> None:
    name = "anjuna_debug_full_2024"
    evidence = document_of(name)
    signature = cbor2.loads(evidence)[3]
    offset = evidence.rfind(signature) + position
    assert rejected(flip(evidence, offset), ctx_for(name)).layer is Layer.SIGNATURE


@pytest.mark.parametrize("cut", [1, 50, 2000])
def test_truncated_document_is_rejected(cut: int) -> None:
    name = "anjuna_prod_pubkey_2021b"
    assert rejected(document_of(name)[:-cut], ctx_for(name)).layer is Layer.FORMAT


def test_structurally_wrong_documents_are_rejected() -> None:
    name = "anjuna_prod_2023"
    protected, unprotected, payload, signature = cbor2.loads(document_of(name))
    for bad in (
        cbor2.dumps([protected, unprotected, payload]),
        cbor2.dumps(cbor2.CBORTag(17, [protected, unprotected, payload, signature])),
        cbor2.dumps([protected, unprotected, cbor2.dumps([1, 2]), signature]),
        cbor2.dumps([cbor2.dumps({1: -7}), unprotected, payload, signature]),  # ES256
    ):
        assert rejected(bad, ctx_for(name)).layer is Layer.FORMAT


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_expired_and_not_yet_valid_leaf_are_rejected(name: str) -> None:
    leaf = x509.load_der_x509_certificate(parse_document(document_of(name)).certificate)
    second = dt.timedelta(seconds=1)
    for when in (
        leaf.not_valid_after_utc + second,
        leaf.not_valid_before_utc - second,
        dt.datetime(2050, 1, 1, tzinfo=dt.UTC),
    ):
        error = rejected(document_of(name), ctx_for(name, now=when))
        assert error.layer is Layer.CHAIN and "enclave certificate" in str(error)


def test_untrusted_root_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "aws_nitro_enclaves_root_g1.pem").write_bytes((ROOTS / "amd_milan_ark.pem").read_bytes())
    name = "anjuna_prod_2021a"
    error = rejected(document_of(name), ctx_for(name, roots=Roots(tmp_path)))
    assert error.layer is Layer.CHAIN and "root" in str(error)


def _make_cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, now: dt.datetime,
) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


def _forge(name: str, cabundle_root: bytes) -> tuple[bytes, dt.datetime]:
    """A document with the sample's payload, re-signed by a key the attacker controls."""
    now = ctx_for(name).now
    ca_key = ec.generate_private_key(ec.SECP384R1())
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    ca = _make_cert("forged CA", ca_key, None, ca_key, now)
    leaf = _make_cert("forged enclave", leaf_key, ca, ca_key, now)
    protected, unprotected, payload_bytes, _ = cbor2.loads(document_of(name))
    payload = cbor2.loads(payload_bytes)
    payload["certificate"] = leaf.public_bytes(Encoding.DER)
    payload["cabundle"] = [cabundle_root, ca.public_bytes(Encoding.DER)]
    payload_bytes = cbor2.dumps(payload)
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload_bytes])
    r, s = decode_dss_signature(leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    return cbor2.dumps([protected, unprotected, payload_bytes, signature]), now


def test_document_signed_by_foreign_chain_is_rejected() -> None:
    name = "anjuna_prod_2023"
    aws_root = x509.load_pem_x509_certificate((ROOTS / "aws_nitro_enclaves_root_g1.pem").read_bytes())
    # The cabundle names the real AWS root, but the CA under it was not issued by AWS.
    forged, now = _forge(name, aws_root.public_bytes(Encoding.DER))
    error = rejected(forged, ctx_for(name, now=now))
    assert error.layer is Layer.CHAIN
    # The cabundle starts with the forger's own root.
    forged, now = _forge(name, b"\x30\x03\x02\x01\x00")
    assert rejected(forged, ctx_for(name, now=now)).layer is Layer.CHAIN


def test_nonce_freshness() -> None:
    name = "anjuna_debug_full_2024"
    nonce = bytes.fromhex(SAMPLES[name]["expected"]["nonce_hex"])
    NitroVerifier().verify(document_of(name), ctx_for(name, nonce=nonce))
    for wrong in (nonce[:-1], nonce + b"\0", b"Nonce\x0b"):
        assert rejected(document_of(name), ctx_for(name, nonce=wrong)).layer is Layer.FRESHNESS
    # A document without a nonce cannot answer a challenge.
    other = "anjuna_prod_2023"
    assert rejected(document_of(other), ctx_for(other, nonce=nonce)).layer is Layer.FRESHNESS


def test_user_data_binding() -> None:
    name = "anjuna_prod_2023"
    user_data = bytes.fromhex(SAMPLES[name]["expected"]["user_data_hex"])
    assert user_data == b"Hello World!\n"
    NitroVerifier().verify(document_of(name), ctx_for(name, expected_report_data=user_data))
    NitroVerifier().verify(document_of(name), ctx_for(name, expected_report_data=b"Hello"))
    for wrong in (b"Hello World?\n", user_data + b"\0", b"\0" * 32):
        error = rejected(document_of(name), ctx_for(name, expected_report_data=wrong))
        assert error.layer is Layer.KEY_BINDING
    other = "anjuna_prod_2021a"  # no user_data at all
    assert rejected(document_of(other), ctx_for(other, expected_report_data=b"x")).layer is Layer.KEY_BINDING
