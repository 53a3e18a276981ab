"""AWS Nitro Enclaves attestation document verifier.

An attestation document is a COSE_Sign1 structure (RFC 9052; CBOR tag 18 optional) whose payload is a CBOR
map (module_id, digest, timestamp, pcrs, certificate, cabundle, public_key, user_data, nonce), signed with
ES384 by the enclave's leaf certificate. ``cabundle`` runs from the AWS Nitro Enclaves root to the issuer of
the leaf; the root must be the trusted ``aws_nitro_enclaves_root_g1`` and every link must verify and be
valid at the verification time (leaf certificates live about three hours).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext
from clave.attestation.certs import check_issued_by, check_valid_at, common_name, load_der

COSE_SIGN1_TAG = 18
COSE_HEADER_ALG = 1
COSE_ALG_ES384 = -35
ROOT_NAME = "aws_nitro_enclaves_root_g1"

PCR_SIZES = (32, 48, 64)
MAX_PCRS = 32
# Size limits from the AWS Nitro Enclaves attestation document specification.
MAX_CERT_SIZE = 1024
MAX_PUBLIC_KEY_SIZE = 1024
MAX_USER_DATA_SIZE = 512
MAX_NONCE_SIZE = 512
DEBUG_PCRS = (0, 1, 2)  # a debug-mode enclave reports these as all zeros

# Untagged: array(4) then the protected header as a byte string; tagged: tag 18 first.
_PREFIXES = (b"\x84", b"\xd2\x84")
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


@dataclass(frozen=True)
class NitroDocument:
    """A parsed (not yet verified) attestation document."""

    protected: bytes
    payload: bytes
    signature: bytes
    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: list[bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    def sig_structure(self) -> bytes:
        """The COSE Sig_structure the signature covers (context "Signature1", no external AAD)."""
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])


def _format_error(message: str) -> VerificationError:
    return VerificationError(Layer.FORMAT, message)


def _optional_bytes(payload: Mapping[Any, Any], key: str, limit: int) -> bytes | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) > limit:
        raise _format_error(
            f"attestation document field {key!r} is not a byte string of at most {limit} bytes"
        )
    return value


def _decode(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError) as exc:
        raise _format_error(f"{what} is not valid CBOR: {exc}") from None


def parse_document(data: bytes) -> NitroDocument:
    """Parse a COSE_Sign1 attestation document; raises VerificationError(FORMAT) when malformed."""
    outer = _decode(data, "attestation document")
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != COSE_SIGN1_TAG:
            raise _format_error(f"CBOR tag {outer.tag} is not COSE_Sign1 ({COSE_SIGN1_TAG})")
        outer = outer.value
    if not (isinstance(outer, (list, tuple)) and len(outer) == 4):  # cbor2 makes tagged arrays tuples
        raise _format_error("attestation document is not a COSE_Sign1 array of four items")
    protected, unprotected, payload_bytes, signature = outer
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise _format_error("COSE_Sign1 headers are malformed")
    if not isinstance(payload_bytes, bytes) or not isinstance(signature, bytes):
        raise _format_error("COSE_Sign1 payload or signature is not a byte string")
    header = _decode(protected, "COSE protected header") if protected else {}
    if not isinstance(header, Mapping) or header.get(COSE_HEADER_ALG) != COSE_ALG_ES384:
        raise _format_error(f"COSE algorithm is {header.get(COSE_HEADER_ALG)!r}, expected ES384 (-35)")

    payload = _decode(payload_bytes, "attestation document payload")
    if not isinstance(payload, Mapping):
        raise _format_error("attestation document payload is not a CBOR map")
    module_id = payload.get("module_id")
    if not isinstance(module_id, str) or not module_id:
        raise _format_error("attestation document has no module_id")
    digest = payload.get("digest")
    if digest != "SHA384":
        raise _format_error(f"attestation document digest is {digest!r}, expected 'SHA384'")
    timestamp = payload.get("timestamp")
    if not isinstance(timestamp, int) or timestamp <= 0:
        raise _format_error("attestation document has no valid timestamp")
    pcrs = payload.get("pcrs")
    if not isinstance(pcrs, Mapping) or not 1 <= len(pcrs) <= MAX_PCRS:
        raise _format_error("attestation document pcrs is not a map of 1 to 32 entries")
    for index, value in pcrs.items():
        if not (isinstance(index, int) and 0 <= index < MAX_PCRS):
            raise _format_error(f"PCR index {index!r} is out of range")
        if not (isinstance(value, bytes) and len(value) in PCR_SIZES):
            raise _format_error(f"PCR{index} is not 32, 48 or 64 bytes")
    certificate = payload.get("certificate")
    if not isinstance(certificate, bytes) or not 1 <= len(certificate) <= MAX_CERT_SIZE:
        raise _format_error("attestation document certificate is missing or oversized")
    cabundle = payload.get("cabundle")
    if not (isinstance(cabundle, (list, tuple)) and cabundle):
        raise _format_error("attestation document cabundle is empty")
    if not all(isinstance(c, bytes) and 1 <= len(c) <= MAX_CERT_SIZE for c in cabundle):
        raise _format_error("attestation document cabundle holds a malformed certificate")
    return NitroDocument(
        protected=protected,
        payload=payload_bytes,
        signature=signature,
        module_id=module_id,
        digest=digest,
        timestamp_ms=timestamp,
        pcrs=dict(sorted(pcrs.items())),
        certificate=certificate,
        cabundle=list(cabundle),
        public_key=_optional_bytes(payload, "public_key", MAX_PUBLIC_KEY_SIZE),
        user_data=_optional_bytes(payload, "user_data", MAX_USER_DATA_SIZE),
        nonce=_optional_bytes(payload, "nonce", MAX_NONCE_SIZE),
    )


def _check_link(cert: x509.Certificate, issuer: x509.Certificate, depth_below: int, what: str) -> None:
    """``issuer`` signed ``cert``, and is a CA allowed ``depth_below`` more CAs under it."""
    issuer_name = common_name(issuer.subject)
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise VerificationError(Layer.CHAIN, f"{issuer_name} has no basicConstraints") from None
    if not constraints.ca:
        raise VerificationError(Layer.CHAIN, f"{issuer_name} is not a CA but issued {what}")
    if constraints.path_length is not None and depth_below > constraints.path_length:
        raise VerificationError(Layer.CHAIN, f"{issuer_name} path length constraint exceeded")
    check_issued_by(cert, issuer, what)


def _as_utc(now: _dt.datetime) -> _dt.datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=_dt.UTC)


def _hex(value: bytes | None) -> str | None:
    return value.hex() if value is not None else None


class NitroVerifier(Verifier):
    """Verifies AWS Nitro Enclaves attestation documents against the AWS Nitro root."""

    name = "nitro"
    tee = "nitro"
    priority = 50

    def matches(self, evidence: bytes) -> bool:
        if not evidence.startswith(_PREFIXES):
            return False
        try:
            outer = cbor2.loads(evidence)
            if isinstance(outer, cbor2.CBORTag):
                outer = outer.value
            header = cbor2.loads(outer[0])
            return isinstance(header, Mapping) and header.get(COSE_HEADER_ALG) == COSE_ALG_ES384
        except Exception:  # a sniff: anything unparsable is simply not ours
            return False

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        document = parse_document(evidence)
        leaf = load_der(document.certificate, "enclave certificate")
        self._check_signature(document, leaf)
        self._check_chain(document, leaf, ctx)
        claims = self._claims(document)
        self._check_nonce(document, ctx)
        self._check_user_data(document, ctx)
        return VerifiedEvidence(tee=self.tee, claims=claims)

    def _check_signature(self, document: NitroDocument, leaf: x509.Certificate) -> None:
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise VerificationError(Layer.CHAIN, "enclave certificate key is not ECDSA P-384")
        if len(document.signature) != 96:
            raise VerificationError(
                Layer.SIGNATURE, f"ES384 signature is {len(document.signature)} bytes, expected 96"
            )
        r = int.from_bytes(document.signature[:48], "big")
        s = int.from_bytes(document.signature[48:], "big")
        try:
            key.verify(encode_dss_signature(r, s), document.sig_structure(), ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise VerificationError(
                Layer.SIGNATURE, "COSE_Sign1 signature does not verify with the enclave certificate"
            ) from None

    def _check_chain(self, document: NitroDocument, leaf: x509.Certificate, ctx: VerifyContext) -> None:
        now = _as_utc(ctx.now)
        trusted = x509.load_pem_x509_certificate(ctx.roots.pem(ROOT_NAME))
        if document.cabundle[0] != trusted.public_bytes(Encoding.DER):
            raise VerificationError(Layer.CHAIN, "cabundle does not start with the trusted AWS Nitro root")
        chain = [trusted] + [
            load_der(der, f"cabundle[{i}]") for i, der in enumerate(document.cabundle[1:], 1)
        ]
        chain.append(leaf)
        names = ["AWS Nitro root"] + [
            f"cabundle[{i}] ({common_name(c.subject)})" for i, c in enumerate(chain[1:-1], 1)
        ]
        names.append("enclave certificate")
        for depth in range(1, len(chain)):
            cas_below_issuer = len(chain) - depth - 1  # intermediate CAs under the issuer, leaf excluded
            _check_link(chain[depth], chain[depth - 1], cas_below_issuer, names[depth])
        # Leaf first: it is the one that expires (after about three hours).
        for cert, what in reversed(list(zip(chain, names, strict=True))):
            check_valid_at(cert, now, what)

    def _check_nonce(self, document: NitroDocument, ctx: VerifyContext) -> None:
        if ctx.nonce is None:
            return
        if document.nonce is None:
            raise VerificationError(Layer.FRESHNESS, f"document carries no nonce; expected {ctx.nonce.hex()}")
        if document.nonce != ctx.nonce:
            raise VerificationError(
                Layer.FRESHNESS,
                f"document nonce {document.nonce.hex()} is not the expected {ctx.nonce.hex()}",
            )

    def _check_user_data(self, document: NitroDocument, ctx: VerifyContext) -> None:
        expected = ctx.expected_report_data
        if expected is None:
            return
        user_data = document.user_data or b""
        if len(expected) > len(user_data) or user_data[: len(expected)] != expected:
            raise VerificationError(
                Layer.KEY_BINDING,
                f"user_data {user_data.hex() or '(none)'} does not carry the expected {expected.hex()}",
            )

    def _claims(self, document: NitroDocument) -> dict[str, Any]:
        claims: dict[str, Any] = {f"pcr{index}": value.hex() for index, value in document.pcrs.items()}
        timestamp = _EPOCH + _dt.timedelta(milliseconds=document.timestamp_ms)
        claims.update(
            module_id=document.module_id,
            user_data=_hex(document.user_data),
            nonce=_hex(document.nonce),
            public_key=_hex(document.public_key),
            debug=all(index in document.pcrs and not any(document.pcrs[index]) for index in DEBUG_PCRS),
            digest=document.digest,
            timestamp=timestamp.isoformat(),
            timestamp_ms=document.timestamp_ms,
        )
        return claims


PLUGINS = (NitroVerifier,)
