"""Signing WebAssembly enclave modules: Ed25519 keys in PEM and ``MODULE.wasm.sig`` documents.

A signature document is JSON::

    {"format": "clave-wasm-signature/1", "module_sha256": hex, "enclave_config": {...},
     "mrenclave": hex, "public_key": PEM, "signature": hex}

The signature is Ed25519 over ``SIGNED_DOMAIN || mrenclave``; since mrenclave covers the module digest and
the enclave config, it signs both. ``verify`` refuses a missing, malformed, tampered or badly signed
document with one line, and returns the signed enclave config and the signer's identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from clave.enclave.wasm import measure

FORMAT = "clave-wasm-signature/1"
SIGNED_DOMAIN = b"clave-wasm-signature/1\0"
SIG_SUFFIX = ".sig"


class SignatureError(Exception):
    """A module's signature is missing, malformed or wrong; one line."""


@dataclass(frozen=True)
class SignedModule:
    """What a verified signature establishes."""

    mrenclave: bytes
    mrsigner: bytes
    enclave_config: dict[str, int | None]
    module_sha256: bytes


def signature_path(module_path: str) -> str:
    return module_path + SIG_SUFFIX


def generate_key(out_path: str) -> bytes:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600); returns the signer's mrsigner."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return measure.mrsigner(_public_der(key.public_key()))


def _public_der(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: str) -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an Ed25519 key")
    return key


def sign_module(module_path: str, key_path: str, config: dict[str, int | None] | None = None) -> dict[str, str]:
    """Sign a module for an enclave config (default: unlimited) and write ``MODULE.wasm.sig`` beside it."""
    from cryptography.hazmat.primitives import serialization

    key = load_private_key(key_path)
    with open(module_path, "rb") as f:
        digest = measure.module_digest(f.read())
    enclave_config = measure.check_config(config or measure.enclave_config(None))
    mrenclave = measure.mrenclave(digest, enclave_config)
    public = key.public_key()  # type: ignore[attr-defined]
    document = {
        "format": FORMAT,
        "module_sha256": digest.hex(),
        "enclave_config": enclave_config,
        "mrenclave": mrenclave.hex(),
        "public_key": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "signature": key.sign(SIGNED_DOMAIN + mrenclave).hex(),  # type: ignore[attr-defined]
    }
    path = signature_path(module_path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return {"mrenclave": mrenclave.hex(), "mrsigner": measure.mrsigner(_public_der(public)).hex(), "sig": path}


def verify(module: bytes, signature_document: bytes | None, where: str) -> SignedModule:
    """Check a module against its signature document; ``where`` names the module in errors."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature_document is None:
        raise SignatureError(f"{where} is not signed (no {os.path.basename(where)}{SIG_SUFFIX}): "
                             "sign it with 'clave enclave sign'")
    try:
        document = json.loads(signature_document)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        config = measure.check_config(document["enclave_config"])
        signed_digest = bytes.fromhex(document["module_sha256"])
        signed_mrenclave = bytes.fromhex(document["mrenclave"])
        signature = bytes.fromhex(document["signature"])
        public = serialization.load_pem_public_key(document["public_key"].encode())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"signature of {where} is malformed: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SignatureError(f"signature of {where} is malformed: the public key is not Ed25519")
    digest = measure.module_digest(module)
    if digest != signed_digest:
        raise SignatureError(f"{where} does not match its signature (module digest {digest.hex()[:16]}..., "
                             f"signed {signed_digest.hex()[:16]}...): the module was modified")
    mrenclave = measure.mrenclave(digest, config)
    if mrenclave != signed_mrenclave:
        raise SignatureError(f"signature of {where} is malformed: its mrenclave does not match its contents")
    try:
        public.verify(signature, SIGNED_DOMAIN + mrenclave)
    except InvalidSignature:
        raise SignatureError(f"signature of {where} does not verify: the signature was modified") from None
    return SignedModule(mrenclave, measure.mrsigner(_public_der(public)), config, digest)
