"""RA-TLS certificates: X.509 certificates that carry TEE evidence bound to their own key.

Written format (interoperable with rats-tls and Gramine's TCG DICE mode):

- a self-signed X.509 certificate, ECDSA P-256 key by default;
- extension ``2.23.133.5.4.9`` (TCG DICE tagged evidence, non-critical) whose value is
  ``tag(T)([evidence bytes, claims bytes])``;
- claims bytes = the CBOR map ``{"pubkey-hash": h'<CBOR [hash-alg-id, digest of the SubjectPublicKeyInfo
  DER]>', "nonce": h'<verifier nonce>'}``. As rats-tls writes it, the ``pubkey-hash`` value is a byte string
  wrapping the CBOR array; a bare array is accepted on reading. hash-alg-id is the IANA "Named Information"
  id (sha-256 = 1, sha-384 = 7, sha-512 = 8);
- the evidence's report data = SHA-256(claims bytes), zero-padded to 64 bytes;
- optional endorsements (SGX/TDX collateral) in ``2.23.133.5.4.2`` = ``tag(T)([version, tcb_info,
  tcb_info_issuer_chain, pck_crl, root_ca_crl, pck_crl_issuer_chain, qe_identity, qe_identity_issuer_chain,
  (creation time)])``, read into the verifier's collateral for roles the caller did not give.

CBOR tags: the rats-tls ones (60000 SGX/TDX quote, told apart by the quote header's TEE type; 60002 SGX
local report; 0x1a7504 SEV-SNP; 0x1a7505 SEV; 0x1a7506 CSV) and Clave-private ones, unregistered and
chosen next to them, for evidence rats-tls has no tag for: 0x1a75c0 TPM 2.0 quote, 0x1a75c1 AWS Nitro
attestation document, 0x1a75c2 Clave WASM enclave, 0x1a75cf Clave ``sample`` (insecure).

Read-only legacy format (Gramine before TCG DICE, older enclave-tls): extension ``1.2.840.113741.1337.6``
holds a raw SGX ECDSA quote whose report data starts with SHA-256 of the certificate's SubjectPublicKeyInfo
DER (what mbedTLS's ``mbedtls_pk_write_pubkey_der`` emits); it carries no nonce.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clave.attestation.appraise import UnknownTee, check_bound, pick_verifier, run_verifier
from clave.attestation.base import (
    Attester,
    Collateral,
    Evidence,
    Layer,
    VerificationError,
    VerifiedEvidence,
    VerifyContext,
)
from clave.attestation.policy import DEFAULT_POLICY, Policy

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

TCG_DICE_TAGGED_EVIDENCE_OID = "2.23.133.5.4.9"
TCG_DICE_ENDORSEMENT_OID = "2.23.133.5.4.2"
LEGACY_SGX_ECDSA_QUOTE_OID = "1.2.840.113741.1337.6"
_LEGACY_UNSUPPORTED = {
    **{f"1.2.840.113741.1337.{n}": "SGX EPID/IAS attestation" for n in (2, 3, 4, 5)},
    "1.2.840.113741.1337.14": "SGX local report (verifiable only on the same platform)",
}

TAG_INTEL_TEE_QUOTE = 60000
TAG_INTEL_TEE_REPORT = 60001
TAG_SGX_LOCAL_REPORT = 60002
TAG_SEV_SNP = 0x1A7504
TAG_SEV = 0x1A7505
TAG_CSV = 0x1A7506
TAG_TPM = 0x1A75C0  # Clave-private
TAG_NITRO = 0x1A75C1  # Clave-private
TAG_WASM = 0x1A75C2  # Clave-private
TAG_SAMPLE = 0x1A75CF  # Clave-private, insecure development evidence

_TAG_OF_TEE = {
    "sgx": TAG_INTEL_TEE_QUOTE,
    "tdx": TAG_INTEL_TEE_QUOTE,
    "snp": TAG_SEV_SNP,
    "tpm": TAG_TPM,
    "nitro": TAG_NITRO,
    "wasm": TAG_WASM,
    "sample": TAG_SAMPLE,
}
_TEE_OF_PRIVATE_TAG = {
    TAG_SEV_SNP: "snp", TAG_TPM: "tpm", TAG_NITRO: "nitro", TAG_WASM: "wasm", TAG_SAMPLE: "sample"
}
_UNSUPPORTED_TAGS = {
    TAG_INTEL_TEE_REPORT: "Intel TEE report (verifiable only on the same platform)",
    TAG_SGX_LOCAL_REPORT: "SGX local report (verifiable only on the same platform)",
    TAG_SEV: "AMD SEV (pre-SNP) report",
    TAG_CSV: "Hygon CSV report",
}

# IANA Named Information hash algorithm registry.
HASH_ALG_IDS = {1: "sha256", 7: "sha384", 8: "sha512"}
SHA256_ID = 1
REPORT_DATA_SIZE = 64
_ENDORSEMENT_ROLES = (
    "tcb_info.json",
    "tcb_info_issuer_chain.pem",
    "pck_crl.der",
    "root_ca_crl.der",
    "pck_crl_issuer_chain.pem",
    "qe_identity.json",
    "qe_identity_issuer_chain.pem",
)


def spki_der(cert_or_key: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a certificate, public key or private key."""
    from cryptography.hazmat.primitives import serialization

    key = cert_or_key.public_key() if hasattr(cert_or_key, "public_key") else cert_or_key
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def encode_claims(public_key_der: bytes, nonce: bytes | None) -> bytes:
    import cbor2

    pubkey_hash = cbor2.dumps([SHA256_ID, hashlib.sha256(public_key_der).digest()])
    claims: dict[str, bytes] = {"pubkey-hash": pubkey_hash}
    if nonce is not None:
        claims["nonce"] = nonce
    return bytes(cbor2.dumps(claims))


def report_data_for_claims(claims: bytes) -> bytes:
    return hashlib.sha256(claims).digest().ljust(REPORT_DATA_SIZE, b"\0")


def quote_tee(quote: bytes) -> str:
    """SGX or TDX, from an Intel quote header (version u16, key type u16, TEE type u32)."""
    if len(quote) < 8:
        raise VerificationError(Layer.FORMAT, f"Intel quote truncated ({len(quote)} bytes)")
    version, key_type, tee_type = struct.unpack_from("<HHI", quote)
    if tee_type == 0x81:
        return "tdx"
    if tee_type == 0 and version >= 3 and key_type in (2, 3):
        return "sgx"
    if tee_type == 0:
        raise VerificationError(Layer.FORMAT, f"SGX EPID or unknown quote (v{version}, key type {key_type})")
    raise VerificationError(Layer.FORMAT, f"unknown Intel quote TEE type {tee_type:#x}")


def tee_of_tag(tag: int, evidence: bytes) -> str:
    if tag == TAG_INTEL_TEE_QUOTE:
        return quote_tee(evidence)
    if tag in _TEE_OF_PRIVATE_TAG:
        return _TEE_OF_PRIVATE_TAG[tag]
    if tag in _UNSUPPORTED_TAGS:
        raise VerificationError(Layer.FORMAT, f"unsupported evidence: {_UNSUPPORTED_TAGS[tag]}")
    raise VerificationError(Layer.FORMAT, f"unknown evidence CBOR tag {tag:#x}")


def tag_of_tee(tee: str) -> int:
    base = tee.removesuffix("_ecdsa").replace("sev_snp", "snp")
    try:
        return _TAG_OF_TEE[base]
    except KeyError:
        raise ValueError(f"no RA-TLS CBOR tag for TEE {tee!r}") from None


@dataclass
class AttestedCertificate:
    """A freshly issued RA-TLS certificate with its private key and the evidence inside it."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes
    evidence: Evidence
    claims: bytes

    @property
    def der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.certificate.public_bytes(serialization.Encoding.DER)

    def cert_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def generate_key() -> CertificateIssuerPrivateKeyTypes:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _signature_hash(key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def build_certificate(
    key: CertificateIssuerPrivateKeyTypes,
    extensions: dict[str, bytes],
    *,
    common_name: str = "Clave attested TLS",
    validity: _dt.timedelta = _dt.timedelta(hours=1),
    not_before: _dt.datetime | None = None,
) -> x509.Certificate:
    """A self-signed certificate for ``key`` carrying ``extensions`` (OID string -> raw value), valid from
    ``not_before`` (default: five minutes ago, tolerating clock skew between peers) for ``validity``."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
        .not_valid_before(start)
        .not_valid_after(start + validity)
    )
    for oid, value in extensions.items():
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, _signature_hash(key))


def _encode_endorsements(tag: int, collateral: Collateral) -> bytes:
    import cbor2

    items: list[Any] = [3]
    for role in _ENDORSEMENT_ROLES:
        items.append(collateral.get(role) or b"")
    return bytes(cbor2.dumps(cbor2.CBORTag(tag, items)))


def create_certificate(
    attester: Attester,
    *,
    nonce: bytes | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    endorsements: Collateral | None = None,
    common_name: str = "Clave attested TLS",
    validity: _dt.timedelta = _dt.timedelta(hours=1),
    not_before: _dt.datetime | None = None,
) -> AttestedCertificate:
    """Issue an RA-TLS certificate: fresh evidence from ``attester`` binding ``key`` and ``nonce``."""
    import cbor2

    key = key or generate_key()
    claims = encode_claims(spki_der(key), nonce)
    evidence = attester.attest(report_data_for_claims(claims))
    tag = tag_of_tee(evidence.tee)
    extensions = {TCG_DICE_TAGGED_EVIDENCE_OID: cbor2.dumps(cbor2.CBORTag(tag, [evidence.data, claims]))}
    if endorsements is not None and tag == TAG_INTEL_TEE_QUOTE:
        extensions[TCG_DICE_ENDORSEMENT_OID] = _encode_endorsements(tag, endorsements)
    cert = build_certificate(key, extensions, common_name=common_name, validity=validity, not_before=not_before)
    return AttestedCertificate(cert, key, evidence, claims)


@dataclass
class AttestedPeer:
    """What an RA-TLS certificate proved, after verification, key binding, freshness and policy."""

    verified: VerifiedEvidence
    certificate_der: bytes
    format: str  # "tcg-dice" or "gramine-legacy"
    nonce: bytes | None
    warnings: list[str] = field(default_factory=list)

    @property
    def tee(self) -> str:
        return self.verified.tee

    @property
    def claims(self) -> dict[str, Any]:
        return self.verified.as_json()

    @property
    def insecure(self) -> bool:
        return self.verified.insecure


def load_certificate(data: bytes) -> x509.Certificate:
    from cryptography import x509

    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise VerificationError(Layer.FORMAT, f"not an X.509 certificate: {exc}") from None


def _extensions(cert: x509.Certificate) -> dict[str, bytes]:
    from cryptography import x509

    try:
        exts = cert.extensions
    except ValueError as exc:
        raise VerificationError(Layer.FORMAT, f"certificate extensions malformed: {exc}") from None
    out: dict[str, bytes] = {}
    for ext in exts:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            out[ext.oid.dotted_string] = ext.value.value
    return out


def _decode_tagged(value: bytes, what: str) -> tuple[int, Any]:
    import cbor2

    try:
        item = cbor2.loads(value)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise VerificationError(Layer.FORMAT, f"{what} is not CBOR: {exc}") from None
    if not isinstance(item, cbor2.CBORTag):
        raise VerificationError(Layer.FORMAT, f"{what} is not a tagged CBOR item")
    return item.tag, item.value


def _decode_claims(claims: bytes) -> tuple[str, bytes, bytes | None]:
    """(hash algorithm name, public key digest, nonce or None) from the claims bytes."""
    import cbor2

    try:
        decoded = cbor2.loads(claims)
        pubkey_hash: Any = decoded.get("pubkey-hash") if isinstance(decoded, dict) else None
        if isinstance(pubkey_hash, bytes):  # rats-tls wraps the hash entry in a byte string
            pubkey_hash = cbor2.loads(pubkey_hash)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise VerificationError(Layer.FORMAT, f"RA-TLS claims are not CBOR: {exc}") from None
    entry_ok = isinstance(pubkey_hash, list | tuple) and len(pubkey_hash) == 2
    if not entry_ok or not isinstance(pubkey_hash[1], bytes):
        raise VerificationError(Layer.FORMAT, "RA-TLS claims lack a pubkey-hash [alg-id, digest]")
    alg = HASH_ALG_IDS.get(pubkey_hash[0]) if isinstance(pubkey_hash[0], int) else None
    if alg is None:
        raise VerificationError(Layer.FORMAT, f"unsupported pubkey-hash algorithm id {pubkey_hash[0]!r}")
    nonce = decoded.get("nonce")
    if nonce is not None and not isinstance(nonce, bytes):
        raise VerificationError(Layer.FORMAT, "RA-TLS claim 'nonce' is not a byte string")
    return alg, pubkey_hash[1], nonce


class _CollateralWithEndorsements(Collateral):
    """The caller's collateral first, then what the certificate's endorsements extension carried."""

    def __init__(self, base: Collateral, endorsed: dict[str, bytes]) -> None:
        super().__init__(None, **{})
        self._base = base
        self._endorsed = endorsed

    def get(self, role: str) -> bytes | None:
        found = self._base.get(role)
        return found if found is not None else super().get(role) or self._endorsed.get(role)


def _collateral_with_endorsements(ctx: VerifyContext, value: bytes) -> Collateral:
    _tag, items = _decode_tagged(value, "endorsements extension")
    if not isinstance(items, list | tuple) or len(items) < 1 + len(_ENDORSEMENT_ROLES):
        raise VerificationError(Layer.COLLATERAL, "endorsements extension is not the 8/9-entry array")
    endorsed: dict[str, bytes] = {}
    for role, item in zip(_ENDORSEMENT_ROLES, items[1:], strict=False):
        if isinstance(item, bytes | str) and item:
            data = item.encode() if isinstance(item, str) else item
            endorsed[role] = data.rstrip(b"\0")  # C producers count the string terminator
    return _CollateralWithEndorsements(ctx.collateral, endorsed)


def _check_validity(cert: x509.Certificate, now: _dt.datetime) -> None:
    if now < cert.not_valid_before_utc or now > cert.not_valid_after_utc:
        raise VerificationError(
            Layer.FRESHNESS,
            f"certificate valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {now:%Y-%m-%dT%H:%M:%SZ}",
        )


def _verify_evidence(tee: str, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
    try:
        verifier = pick_verifier(evidence, tee)
    except UnknownTee as exc:
        raise VerificationError(Layer.FORMAT, str(exc)) from None
    return run_verifier(verifier, evidence, ctx)


def _as_certificate(cert: bytes | x509.Certificate) -> x509.Certificate:
    return load_certificate(cert) if isinstance(cert, bytes | bytearray) else cert


def verify_certificate(
    cert: bytes | x509.Certificate,
    *,
    policy: Policy = DEFAULT_POLICY,
    nonce: bytes | None = None,
    ctx: VerifyContext | None = None,
) -> AttestedPeer:
    """Verify an RA-TLS certificate; raise VerificationError naming the failing layer.

    Order: extension format -> evidence (by the verifier its CBOR tag names, with the expected report data
    = SHA-256 of the claims) -> pubkey-hash vs the certificate's key (key binding) -> ``nonce``, when given,
    vs the claims' nonce (freshness) -> ``policy``.
    """
    from cryptography import exceptions as crypto_exceptions
    from cryptography.hazmat.primitives import serialization

    ctx = ctx or VerifyContext()
    cert = _as_certificate(cert)
    try:
        cert.verify_directly_issued_by(cert)
    except (crypto_exceptions.InvalidSignature, ValueError, TypeError):
        raise VerificationError(Layer.SIGNATURE, "certificate self-signature does not verify") from None
    _check_validity(cert, ctx.now)
    extensions = _extensions(cert)
    key_der = spki_der(cert)
    der = cert.public_bytes(serialization.Encoding.DER)

    if TCG_DICE_TAGGED_EVIDENCE_OID in extensions:
        tag, pair = _decode_tagged(extensions[TCG_DICE_TAGGED_EVIDENCE_OID], "tagged evidence extension")
        pair_ok = isinstance(pair, list | tuple) and len(pair) == 2
        if not pair_ok or not all(isinstance(x, bytes) for x in pair):
            raise VerificationError(Layer.FORMAT, "tagged evidence is not [evidence bytes, claims bytes]")
        evidence, claims = pair
        tee = tee_of_tag(tag, evidence)
        alg, pubkey_digest, claimed_nonce = _decode_claims(claims)
        expected = report_data_for_claims(claims)
        collateral = ctx.collateral
        if TCG_DICE_ENDORSEMENT_OID in extensions:
            collateral = _collateral_with_endorsements(ctx, extensions[TCG_DICE_ENDORSEMENT_OID])
        vctx = dataclasses.replace(ctx, expected_report_data=expected, nonce=None, collateral=collateral)
        verified = _verify_evidence(tee, evidence, vctx)
        check_bound(verified, expected, Layer.KEY_BINDING, "the SHA-256 of the certificate's claims")
        if hashlib.new(alg, key_der).digest() != pubkey_digest:
            raise VerificationError(Layer.KEY_BINDING, "pubkey-hash claim does not match the certificate key")
        fmt = "tcg-dice"
    elif LEGACY_SGX_ECDSA_QUOTE_OID in extensions:
        evidence = extensions[LEGACY_SGX_ECDSA_QUOTE_OID]
        # Gramine binds the key in the first 32 bytes of report data and checks only those.
        key_digest = hashlib.sha256(key_der).digest()
        vctx = dataclasses.replace(ctx, expected_report_data=key_digest, nonce=None)
        verified = _verify_evidence(quote_tee(evidence), evidence, vctx)
        if not str(verified.claims.get("report_data", "")).startswith(key_digest.hex()):
            raise VerificationError(Layer.KEY_BINDING, "report data does not start with SHA-256 of the key")
        claimed_nonce = None
        fmt = "gramine-legacy"
    else:
        for oid, what in _LEGACY_UNSUPPORTED.items():
            if oid in extensions:
                raise VerificationError(Layer.FORMAT, f"unsupported legacy RA-TLS evidence: {what}")
        raise VerificationError(Layer.FORMAT, "certificate carries no attestation evidence extension")

    warnings = list(verified.warnings)
    if nonce is not None:
        if claimed_nonce is None:
            raise VerificationError(Layer.FRESHNESS, f"{fmt} certificate carries no nonce")
        if claimed_nonce != nonce:
            raise VerificationError(Layer.FRESHNESS, "certificate nonce is not ours (replayed certificate?)")
    else:
        warnings.append("no nonce checked: this certificate may be a replay")
    warnings += policy.check(verified)
    return AttestedPeer(verified, der, fmt, claimed_nonce, warnings)


def peek_tee(cert: bytes | x509.Certificate) -> str | None:
    """Best-effort TEE name of a certificate's evidence, without verifying anything (for reports)."""
    try:
        extensions = _extensions(_as_certificate(cert))
        if TCG_DICE_TAGGED_EVIDENCE_OID in extensions:
            tag, pair = _decode_tagged(extensions[TCG_DICE_TAGGED_EVIDENCE_OID], "tagged evidence")
            return tee_of_tag(tag, pair[0] if isinstance(pair, list | tuple) and pair else b"")
        if LEGACY_SGX_ECDSA_QUOTE_OID in extensions:
            return quote_tee(extensions[LEGACY_SGX_ECDSA_QUOTE_OID])
    except (VerificationError, TypeError):
        return None
    return None
