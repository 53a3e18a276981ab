"""The relay's wire protocol and what a container's report data binds. Shared by the relay and the verifier;
imports neither the runtime nor the attestation stack.

After the attested-TLS handshake (:mod:`clave.attestation.tls`) the verifier sends ONE JSON object and the relay
answers with ONE JSON object, then closes the connection. No length prefix and no newline are needed, as in
inclavared (which reads one TLS record of up to 512 bytes, parses it with serde_json and writes one JSON reply):
each side reads until the bytes parse as a complete JSON object.

inclavared's shape, kept as is::

    -> {"type": "GETENCLAVEINFO"}                       (Clave accepts an optional "container": ID)
    <- {"id": "...", "msgtype": "ENCLAVEINFO", "version": 1,
        "mrenclave": "<64 hex, lowercase>", "mrsigner": "<64 hex, lowercase>", "message": "<text>"}

ENCLAVEINFO values are the relay's word only (the container's runtime told the relay): use GETEVIDENCE to
verify them. The richer form Clave adds::

    -> {"type": "GETEVIDENCE", "version": 1, "container": ID, "nonce": "<64 hex: 32 fresh random bytes>"}
    <- {"id", "msgtype": "EVIDENCE", "version": 1, "container": ID, "tee": "wasm", "insecure": true,
        "mrenclave", "mrsigner", "report_data": "<128 hex>", "evidence": "<base64>",
        "platform_key": "<PEM>" | null}      (the wasm host's platform public key: trust on first use only)
    <- {"id", "msgtype": "ERROR", "version": 1, "message": "<one line>"}   (any failure)

Report data of the container's evidence (64 bytes, see :func:`container_report_data`)::

    nonce (32 bytes) || SHA-256(DOMAIN || nonce || SHA-256(relay TLS SubjectPublicKeyInfo DER) || container id)

The nonce leads so that a stale reply is told apart (freshness) from one bound to another container or relay
session (key binding).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

VERSION = 1
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64
DOMAIN = b"clave-relay container evidence v1\0"
MAX_REQUEST = 64 * 1024
MAX_REPLY = 8 * 1024 * 1024
DEFAULT_PORT = 1234  # shelter's default relay port

GET_ENCLAVE_INFO = "GETENCLAVEINFO"
GET_EVIDENCE = "GETEVIDENCE"
ENCLAVE_INFO = "ENCLAVEINFO"
EVIDENCE = "EVIDENCE"
ERROR = "ERROR"


class ProtocolError(Exception):
    """A peer sent something this protocol does not allow; one line."""


def parse_address(text: str) -> tuple[str, int] | str:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (loopback) or a unix socket path (anything with a slash)."""
    if "/" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT or a socket path: {text!r}")
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)


def relay_key_hash(spki_der: bytes) -> bytes:
    """What identifies the relay's attested-TLS session: SHA-256 of its certificate's SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der).digest()


def container_report_data(nonce: bytes, relay_key: bytes, container_id: str) -> bytes:
    """The 64 bytes of report data the container's evidence must carry for this request."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"the nonce must be {NONCE_SIZE} bytes, not {len(nonce)}")
    if len(relay_key) != 32:
        raise ValueError("the relay key hash must be a SHA-256 digest")
    binding = hashlib.sha256(DOMAIN + nonce + relay_key + container_id.encode()).digest()
    return nonce + binding


def new_message_id() -> str:
    return os.urandom(8).hex()


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def read_message(recv: Callable[[int], bytes], limit: int) -> dict[str, Any]:
    """Read until the bytes received form one JSON object (or EOF); at most ``limit`` bytes."""
    data = bytearray()
    while True:
        chunk = recv(65536)
        if chunk:
            data += chunk
            if len(data) > limit:
                raise ProtocolError(f"message longer than {limit} bytes")
        try:
            message = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if chunk:
                continue  # incomplete: wait for more
            if not data:
                raise ProtocolError("peer closed the connection without a message") from None
            raise ProtocolError(f"message is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("message is not a JSON object")
        return message


def error_reply(message: str) -> dict[str, Any]:
    return {"id": new_message_id(), "msgtype": ERROR, "version": VERSION, "message": message}


def parse_nonce(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("nonce must be a hex string")
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise ProtocolError("nonce is not hex") from None
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return nonce
