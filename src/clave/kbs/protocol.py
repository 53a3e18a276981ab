"""Wire facts of the KBS protocol (trustee's ``kbs_attestation_protocol.md`` and the ``kbs-types`` crate),
shared by the broker and the client. Stdlib only at import time; joserfc is imported where JWE is used.

Runtime data binding: the client hashes ``runtime-data`` = ``{"nonce": <challenge nonce>, "tee-pubkey": <JWK>}``
serialised as serde_json serialises a ``serde_json::Value`` (compact, object keys sorted, UTF-8 unescaped)
with the hash named by the challenge's ``extra-params["selected-hash-algorithm"]`` (sha384 when absent, the
default of trustee's ``kbs_protocol`` client), and puts the digest in the evidence's report data, zero-padded.

Resource responses are JWE in flattened JSON serialisation, shaped as ``kbs_types::Response``:
``{"protected", "encrypted_key", "iv", "ciphertext", "tag"}`` with every header parameter (``alg``, ``enc``
and, for ECDH-ES, ``epk``) in the protected header, which is also the AEAD's additional data (RFC 7516 §5.1).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX = "/kbs/v0"
PROTOCOL_VERSION = "0.4.0"  # what trustee's kbs_protocol client sends and its KBS requires
SESSION_COOKIE = "kbs-session-id"
ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
PROBLEM_CONTENT_TYPE = "application/problem+json"

SUPPORTED_HASH_ALGORITHMS_KEY = "supported-hash-algorithms"
SELECTED_HASH_ALGORITHM_KEY = "selected-hash-algorithm"
DEFAULT_HASH_ALGORITHM = "sha384"
HASH_ALGORITHMS = ("sha256", "sha384", "sha512")

# The TEE key the client generates (trustee's default: EC P-256 with ECDH-ES+A256KW) and the content cipher.
TEE_KEY_CURVE = "P-256"
TEE_KEY_ALG = "ECDH-ES+A256KW"
KEY_WRAP_ALGS = ("ECDH-ES+A256KW", "RSA-OAEP", "RSA-OAEP-256")
CONTENT_ENC = "A256GCM"
RESPONSE_FIELDS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")

# TEE names of the Request (kbs-types' Tee names; ``wasm`` is Clave's WebAssembly enclave runtime).
TEES = ("sgx", "tdx", "snp", "tpm", "wasm", "sample")
# Software-only evidence, or evidence that does not prove memory confidentiality (a TPM quote, swtpm):
# the broker refuses it unless started with --allow-insecure.
INSECURE_TEES = frozenset({"tpm", "wasm", "sample"})


def canonical_json(value: Any) -> bytes:
    """JSON as serde_json writes a ``serde_json::Value``: no whitespace, keys sorted, non-ASCII as UTF-8."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def runtime_data_digest(runtime_data: Any, algorithm: str = DEFAULT_HASH_ALGORITHM) -> bytes:
    """The bytes a TEE must carry in its report data for ``runtime_data``."""
    if algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"unsupported runtime data hash algorithm {algorithm!r} (known: {', '.join(HASH_ALGORITHMS)})")
    return hashlib.new(algorithm, canonical_json(runtime_data)).digest()


def jwe_to_response(compact: str) -> dict[str, str]:
    """A compact JWE (all headers protected) as the flattened JSON object kbs-types calls ``Response``."""
    parts = compact.split(".")
    if len(parts) != 5:
        raise ValueError("not a compact JWE (expected 5 parts)")
    return dict(zip(RESPONSE_FIELDS, parts, strict=True))


def response_to_jwe(response: Any) -> str:
    """The compact form of a ``Response`` object; rejects a per-recipient or unprotected header, which the
    protocol does not use and which would sit outside the additional authenticated data."""
    if not isinstance(response, dict):
        raise ValueError("resource response is not a JSON object")
    extra = set(response) - set(RESPONSE_FIELDS) - {"aad"}
    if extra:
        raise ValueError(f"resource response has unexpected fields {sorted(extra)}")
    parts = []
    for name in RESPONSE_FIELDS:
        value = response.get(name)
        if not isinstance(value, str):
            raise ValueError(f"resource response field {name!r} is missing or not a string")
        parts.append(value)
    return ".".join(parts)


def problem_title(error_type: str) -> str:
    """``AttestationError`` from ``https://.../errors/AttestationError``."""
    return error_type.rsplit("/", 1)[-1]
