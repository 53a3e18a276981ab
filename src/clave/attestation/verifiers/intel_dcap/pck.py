"""PCK certificate chain: parse, chain to the Intel SGX Root CA, read the SGX extension, apply CRLs.

Signature checks are cached by input bytes (they do not depend on time); validity windows and revocation are
checked on every call against the caller's ``now``.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clave.attestation.base import Layer, VerificationError

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"
_OID_TCB = _SGX + ".2"
_OID_PCEID = _SGX + ".3"
_OID_FMSPC = _SGX + ".4"
_OID_SGX_TYPE = _SGX + ".5"
_OID_PCESVN = _OID_TCB + ".17"
_OID_CPUSVN = _OID_TCB + ".18"


@dataclass(frozen=True)
class PckInfo:
    """Platform TCB facts Intel writes into the PCK certificate's SGX extension."""

    fmspc: bytes
    pceid: bytes
    pcesvn: int
    cpusvn: bytes
    sgx_tcb_components: tuple[int, ...]  # 16 SVNs
    sgx_type: int | None


@dataclass(frozen=True)
class PckChain:
    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate
    info: PckInfo
    public_key: ec.EllipticCurvePublicKey


# ---- a small DER reader, enough for the SGX extension (nested SEQUENCEs of OID/value pairs) ----


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    items = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise ValueError("truncated DER")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise ValueError("truncated DER value")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _der_oid(value: bytes) -> str:
    arcs = [value[0] // 40, value[0] % 40] if value[0] < 80 else [2, value[0] - 80]
    acc = 0
    for b in value[1:]:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(acc)
            acc = 0
    return ".".join(map(str, arcs))


def _oid_value_pairs(sequence_body: bytes) -> dict[str, tuple[int, bytes]]:
    pairs: dict[str, tuple[int, bytes]] = {}
    for tag, body in _der_items(sequence_body):
        if tag != 0x30:
            raise ValueError("SGX extension entry is not a SEQUENCE")
        inner = _der_items(body)
        if len(inner) != 2 or inner[0][0] != 0x06:
            raise ValueError("SGX extension entry is not (OID, value)")
        pairs[_der_oid(inner[0][1])] = inner[1]
    return pairs


def parse_sgx_extension(der: bytes) -> PckInfo:
    (outer,) = _der_items(der)
    top = _oid_value_pairs(outer[1])
    tcb = _oid_value_pairs(top[_OID_TCB][1])
    comps = tuple(int.from_bytes(tcb[f"{_OID_TCB}.{i}"][1], "big") for i in range(1, 17))
    sgx_type = int.from_bytes(top[_OID_SGX_TYPE][1], "big") if _OID_SGX_TYPE in top else None
    return PckInfo(
        fmspc=top[_OID_FMSPC][1],
        pceid=top[_OID_PCEID][1],
        pcesvn=int.from_bytes(tcb[_OID_PCESVN][1], "big"),
        cpusvn=tcb[_OID_CPUSVN][1],
        sgx_tcb_components=comps,
        sgx_type=sgx_type,
    )


# ---- chain ----


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@functools.lru_cache(maxsize=256)
def load_pem_chain(pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(pem.rstrip(b"\x00")))
    except ValueError as exc:
        raise VerificationError(Layer.CHAIN, f"unreadable certificate chain: {exc}") from None


@functools.lru_cache(maxsize=8)
def load_root(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise VerificationError(Layer.CHAIN, f"unreadable trust anchor: {exc}") from None


@functools.lru_cache(maxsize=256)
def _verified_pck_chain(chain_pem: bytes, root_pem: bytes) -> PckChain:
    """The time-independent part: structure, signatures up to the trusted root, SGX extension."""
    certs = load_pem_chain(chain_pem)
    root = load_root(root_pem)
    if len(certs) < 2:
        raise VerificationError(Layer.CHAIN, f"PCK chain has {len(certs)} certificate(s), needs 2 or 3")
    leaf, intermediate = certs[0], certs[1]
    if len(certs) > 2 and certs[-1] != root:
        fingerprint = certs[-1].fingerprint(hashes.SHA256()).hex()[:16]
        raise VerificationError(
            Layer.CHAIN, f"PCK chain ends in {common_name(certs[-1])!r} ({fingerprint}...), not the trusted root"
        )
    if not issued_by(leaf, intermediate):
        raise VerificationError(Layer.CHAIN, "PCK certificate is not signed by the PCK CA in the chain")
    if not _is_ca(intermediate) or not issued_by(intermediate, root):
        raise VerificationError(
            Layer.CHAIN, f"{common_name(intermediate)!r} is not a CA issued by the trusted Intel SGX Root CA"
        )
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise VerificationError(Layer.CHAIN, "PCK certificate key is not ECDSA P-256")
    try:
        ext = leaf.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
        info = parse_sgx_extension(ext.value)  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        raise VerificationError(Layer.CHAIN, "PCK certificate lacks the SGX extension") from None
    except (ValueError, KeyError, IndexError) as exc:
        raise VerificationError(Layer.CHAIN, f"malformed SGX extension in PCK certificate: {exc}") from None
    return PckChain(leaf, intermediate, root, info, key)


def check_validity(cert: x509.Certificate, now: dt.datetime, layer: Layer, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerificationError(
            layer,
            f"{what} {common_name(cert)!r} is valid {cert.not_valid_before_utc:%FT%TZ}"
            f"..{cert.not_valid_after_utc:%FT%TZ}, not at {now:%FT%TZ}",
        )


def verify_pck_chain(chain_pem: bytes, root_pem: bytes, now: dt.datetime) -> PckChain:
    chain = _verified_pck_chain(chain_pem, root_pem)
    for cert, what in (
        (chain.leaf, "PCK certificate"),
        (chain.intermediate, "PCK CA"),
        (chain.root, "root CA"),
    ):
        check_validity(cert, now, Layer.CHAIN, what)
    return chain


# ---- CRLs ----


@functools.lru_cache(maxsize=64)
def _verified_crl(der: bytes, issuer: x509.Certificate, role: str) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        try:
            crl = x509.load_pem_x509_crl(der)
        except ValueError as exc:
            raise VerificationError(Layer.COLLATERAL, f"{role} is not a CRL: {exc}") from None
    if crl.issuer != issuer.subject:
        raise VerificationError(
            Layer.COLLATERAL,
            f"{role} is issued by {crl.issuer.rfc4514_string()!r}, not {common_name(issuer)!r}",
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise VerificationError(Layer.COLLATERAL, f"{role} signature does not verify with {common_name(issuer)!r}")
    return crl


def check_crl(
    der: bytes, issuer: x509.Certificate, subjects: list[x509.Certificate], now: dt.datetime, role: str
) -> None:
    """Reject when the CRL is badly signed or out of date, or revokes any of ``subjects``."""
    crl = _verified_crl(der, issuer, role)
    next_update = crl.next_update_utc
    if now < crl.last_update_utc or next_update is None or now > next_update:
        until = f"{next_update:%FT%TZ}" if next_update else "?"
        raise VerificationError(
            Layer.COLLATERAL,
            f"{role} is valid {crl.last_update_utc:%FT%TZ}..{until}, not at {now:%FT%TZ}",
        )
    for cert in subjects:
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise VerificationError(
                Layer.CHAIN, f"{common_name(cert)!r} (serial {cert.serial_number:x}) is revoked by {role}"
            )
