"""Intel PCS collateral: TCB info and QE identity documents signed by the Intel SGX TCB Signing certificate.

A PCS body is ``{"tcbInfo"|"enclaveIdentity": {...}, "signature": "<hex r||s>"}``; the signature covers the
raw bytes of the inner object exactly as served, so the inner object is cut out of the text, never
re-serialised. Intel re-issued the TCB Signing certificate in 2025 with the same key and serial: every
candidate (from the issuer chains given and the packaged copies) that chains to the root is considered and
the one valid at ``now`` is used.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from clave.attestation.base import Layer, VerificationError
from clave.attestation.verifiers.intel_dcap.pck import common_name, issued_by, load_pem_chain

TCB_SIGNING_CN = "Intel SGX TCB Signing"
_WS = re.compile(r"[ \t\r\n]*")


@dataclass(frozen=True)
class SignedDocument:
    role: str  # collateral role, e.g. "tcb_info.json"
    signed: bytes  # raw bytes of the inner object
    signature: bytes  # DER ECDSA signature
    body: dict[str, Any]
    issue_date: dt.datetime
    next_update: dt.datetime


def ecdsa_der(raw_rs: bytes) -> bytes:
    """Intel writes ECDSA signatures as r || s (32 bytes each); cryptography wants DER."""
    half = len(raw_rs) // 2
    return encode_dss_signature(int.from_bytes(raw_rs[:half], "big"), int.from_bytes(raw_rs[half:], "big"))


def parse_time(value: Any, role: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise VerificationError(Layer.COLLATERAL, f"{role}: {name} {value!r} is not a date") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _top_level_spans(text: str) -> dict[str, tuple[int, int, Any]]:
    """Top-level members of a JSON object: key -> (start, end, value), offsets into ``text``."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos += 1
    spans: dict[str, tuple[int, int, Any]] = {}
    while True:
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] == "}":
            return spans
        key, pos = decoder.raw_decode(text, pos)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != ":":
            raise ValueError("expected ':'")
        start = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        value, end = decoder.raw_decode(text, start)
        spans[str(key)] = (start, end, value)
        pos = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] == ",":
            pos += 1
        elif text[pos : pos + 1] != "}":
            raise ValueError("expected ',' or '}'")


@functools.lru_cache(maxsize=128)
def parse_signed_document(raw: bytes, key: str, role: str) -> SignedDocument:
    try:
        text = raw.decode("utf-8")
        spans = _top_level_spans(text)
        start, end, body = spans[key]
        signature_hex = spans["signature"][2]
        signature = ecdsa_der(bytes.fromhex(signature_hex))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError(Layer.COLLATERAL, f"{role} is not a PCS {key} document ({exc})") from None
    if not isinstance(body, dict):
        raise VerificationError(Layer.COLLATERAL, f"{role}: {key} is not an object")
    return SignedDocument(
        role=role,
        signed=text[start:end].encode("utf-8"),
        signature=signature,
        body=body,
        issue_date=parse_time(body.get("issueDate"), role, "issueDate"),
        next_update=parse_time(body.get("nextUpdate"), role, "nextUpdate"),
    )


@functools.lru_cache(maxsize=32)
def signing_candidates(pems: tuple[bytes, ...], root: x509.Certificate) -> tuple[x509.Certificate, ...]:
    """Every TCB Signing certificate among ``pems`` that the root really issued (deduplicated)."""
    found: dict[bytes, x509.Certificate] = {}
    for pem in pems:
        try:
            certs = load_pem_chain(pem)
        except VerificationError:
            continue
        for cert in certs:
            if cert != root and common_name(cert) == TCB_SIGNING_CN and issued_by(cert, root):
                found[cert.fingerprint(hashes.SHA256())] = cert
    return tuple(found.values())


@functools.lru_cache(maxsize=128)
def _signature_ok(signed: bytes, signature: bytes, cert: x509.Certificate) -> bool:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_document(
    doc: SignedDocument, candidates: tuple[x509.Certificate, ...], now: dt.datetime
) -> x509.Certificate:
    """Check the document's signature and validity window at ``now``; return the signing certificate."""
    valid = [c for c in candidates if c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    if not valid:
        raise VerificationError(
            Layer.COLLATERAL,
            f"{doc.role}: no {TCB_SIGNING_CN} certificate from the root is valid at {now:%FT%TZ}",
        )
    signer = next((c for c in valid if _signature_ok(doc.signed, doc.signature, c)), None)
    if signer is None:
        raise VerificationError(Layer.COLLATERAL, f"{doc.role}: signature does not verify with {TCB_SIGNING_CN}")
    if not doc.issue_date <= now <= doc.next_update:
        raise VerificationError(
            Layer.COLLATERAL,
            f"{doc.role} is valid {doc.issue_date:%FT%TZ}..{doc.next_update:%FT%TZ}, not at {now:%FT%TZ}",
        )
    return signer
