"""X.509 helpers shared by the verifiers that walk vendor certificate chains (AMD, AWS, ...)."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from clave.attestation.base import Layer, VerificationError


def load_der(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise VerificationError(Layer.CHAIN, f"{what} is not a valid X.509 certificate: {exc}") from None


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


# Signature checks of certificate links already verified in this process: a link's signature either
# verifies or not, so repeating it for every report signed under the same chain is wasted work. Validity
# periods are still checked on every verification by the callers.
_VERIFIED_LINKS: dict[tuple[bytes, bytes], None] = {}
_VERIFIED_LINKS_MAX = 256


def signature_verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = (cert.public_bytes(Encoding.DER), issuer.public_bytes(Encoding.DER))
    if key in _VERIFIED_LINKS:
        return True
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    if len(_VERIFIED_LINKS) >= _VERIFIED_LINKS_MAX:
        del _VERIFIED_LINKS[next(iter(_VERIFIED_LINKS))]
    _VERIFIED_LINKS[key] = None
    return True


def check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """``cert`` names ``issuer`` as its issuer and carries its valid signature, else a chain rejection."""
    issuer_name = common_name(issuer.subject)
    if cert.issuer != issuer.subject:
        raise VerificationError(Layer.CHAIN, f"{what} is issued by {common_name(cert.issuer)}, not {issuer_name}")
    if not signature_verifies(cert, issuer):
        raise VerificationError(Layer.CHAIN, f"{what} signature does not verify with {issuer_name}")


def check_valid_at(cert: x509.Certificate, now: datetime.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(Layer.CHAIN, f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise VerificationError(Layer.CHAIN, f"{what} expired at {cert.not_valid_after_utc.isoformat()}")
