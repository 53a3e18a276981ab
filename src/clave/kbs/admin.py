"""Admin authentication as trustee's KBS does it: the admin holds an Ed25519 private key and signs a short JWT
(``alg: EdDSA``, claims ``iat`` and ``exp``); the KBS holds the public key (``--admin-pubkey``) and accepts
``Authorization: Bearer <jwt>`` on the admin endpoints when the signature verifies and the token is unexpired.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

ADMIN_ALGS = ["EdDSA", "Ed25519"]  # trustee's kbs-client signs EdDSA; RFC 9864 names the same thing Ed25519
DEFAULT_ADMIN_TOKEN_LIFETIME = 300
MAX_ADMIN_TOKEN_LIFETIME = 24 * 3600


class AdminAuthError(Exception):
    """The admin token is missing, malformed, badly signed or expired; one line."""


def keygen() -> tuple[bytes, bytes]:
    """A new admin key pair: (private key PKCS#8 PEM, public key SubjectPublicKeyInfo PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _okp_key(pem: bytes) -> Any:
    from joserfc.errors import JoseError
    from joserfc.jwk import OKPKey

    try:
        key = OKPKey.import_key(pem)
    except (JoseError, ValueError, TypeError) as exc:
        raise AdminAuthError(f"not an Ed25519 key in PEM: {exc}") from None
    if key.curve_name != "Ed25519":
        raise AdminAuthError(f"admin key is {key.curve_name}, not Ed25519")
    return key


def load_public_key(pem: bytes) -> Any:
    return _okp_key(pem)


def make_admin_token(private_pem: bytes, lifetime: int = DEFAULT_ADMIN_TOKEN_LIFETIME) -> str:
    from joserfc import jwt

    key = _okp_key(private_pem)
    now = int(time.time())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc flags "EdDSA" as superseded; trustee still expects it
        return jwt.encode({"alg": "EdDSA", "typ": "JWT"}, {"iat": now, "exp": now + lifetime}, key,
                          algorithms=ADMIN_ALGS)


def verify_admin_token(authorization: str | None, public_key: Any) -> dict[str, Any]:
    """The claims of a valid admin bearer token; AdminAuthError otherwise."""
    from joserfc import jwt
    from joserfc.errors import JoseError

    if not authorization:
        raise AdminAuthError("no Authorization: Bearer <admin JWT> header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AdminAuthError("Authorization header is not 'Bearer <admin JWT>'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = jwt.decode(token.strip(), public_key, algorithms=ADMIN_ALGS)
    except (JoseError, ValueError) as exc:
        raise AdminAuthError(f"admin token does not verify under the admin public key: {exc}") from None
    claims = dict(decoded.claims)
    now = time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AdminAuthError("admin token has no exp claim")
    if exp <= now:
        raise AdminAuthError("admin token expired")
    if isinstance(iat, int | float) and exp - iat > MAX_ADMIN_TOKEN_LIFETIME:
        raise AdminAuthError(f"admin token lifetime exceeds {MAX_ADMIN_TOKEN_LIFETIME} s")
    return claims
