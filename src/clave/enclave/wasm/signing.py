"""Signing WebAssembly enclave modules: Ed25519 keys in PEM and ``MODULE.wasm.sig`` documents.

A signature document is JSON::

    {"format": "clave-wasm-signature/1", "module_sha256": hex, "enclave_config": {...},
     "mrenclave": hex, "public_key": PEM, "signature": hex}

The signature is Ed25519 over ``SIGNED_DOMAIN || mrenclave``; since mrenclave covers the module digest and
the enclave config, it signs both. ``verify`` refuses a missing, malformed, tampered or badly signed
document with one line, and returns the signed enclave config and the signer's identity.
"""

from __future__ import annotations

import base64
import binascii
import os

from clave import fastjson
from clave.enclave.wasm import measure

FORMAT = "clave-wasm-signature/1"
SIGNED_DOMAIN = b"clave-wasm-signature/1\0"
SIG_SUFFIX = ".sig"
# Fixed DER prefixes of Ed25519 keys (RFC 8410): SubjectPublicKeyInfo and PKCS#8 PrivateKeyInfo; the 32 key
# bytes follow. Parsing them here keeps cryptography's serialization module (~25 ms to import) off the start path.
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


class SignatureError(Exception):
    """A module's signature is missing, malformed or wrong; one line."""


class SignedModule:
    """What a verified signature establishes."""

    __slots__ = ("mrenclave", "mrsigner", "enclave_config", "module_sha256")

    def __init__(self, mrenclave: bytes, mrsigner: bytes, enclave_config: dict[str, int | None],
                 module_sha256: bytes) -> None:
        self.mrenclave = mrenclave
        self.mrsigner = mrsigner
        self.enclave_config = enclave_config
        self.module_sha256 = module_sha256


def pem_body(pem: bytes | str, label: str) -> bytes:
    """The DER inside a PEM block with this label."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no PEM {label} block")
    try:
        return base64.b64decode("".join(text[start + len(begin):stop].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"PEM {label} block is not base64: {exc}") from None


def ed25519_public_raw(pem: bytes | str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key in PEM (SubjectPublicKeyInfo)."""
    der = pem_body(pem, "PUBLIC KEY")
    if len(der) != len(SPKI_PREFIX) + 32 or not der.startswith(SPKI_PREFIX):
        raise ValueError("the public key is not Ed25519")
    return der[len(SPKI_PREFIX):]


def ed25519_private_raw(pem: bytes | str) -> bytes:
    """The 32-byte seed of an unencrypted Ed25519 private key in PEM (PKCS#8)."""
    der = pem_body(pem, "PRIVATE KEY")
    if len(der) != len(PKCS8_PREFIX) + 32 or not der.startswith(PKCS8_PREFIX):
        raise ValueError("the private key is not an unencrypted Ed25519 key")
    return der[len(PKCS8_PREFIX):]


def signer_id(raw_public: bytes) -> bytes:
    """mrsigner of an Ed25519 public key: SHA-256 of its DER SubjectPublicKeyInfo."""
    return measure.mrsigner(SPKI_PREFIX + raw_public)


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
    return signer_id(key.public_key().public_bytes_raw())


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
        f.write(fastjson.dumps_indented(document, indent=" ") + "\n")
    os.replace(tmp, path)
    return {"mrenclave": mrenclave.hex(), "mrsigner": signer_id(public.public_bytes_raw()).hex(), "sig": path}


def verify(module: bytes, signature_document: bytes | None, where: str) -> SignedModule:
    """Check a module against its signature document; ``where`` names the module in errors."""
    return verify_digest(measure.module_digest(module), signature_document, where)


def verify_digest(digest: bytes, signature_document: bytes | None, where: str) -> SignedModule:
    """``verify`` for a module given by its SHA-256 (hashed while streaming: large modules are not read
    into memory when their compiled form is cached)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature_document is None:
        raise SignatureError(f"{where} is not signed (no {os.path.basename(where)}{SIG_SUFFIX}): "
                             "sign it with 'clave enclave sign'")
    try:
        document = fastjson.loads(signature_document)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        config = measure.check_config(document["enclave_config"])
        signed_digest = bytes.fromhex(document["module_sha256"])
        signed_mrenclave = bytes.fromhex(document["mrenclave"])
        signature = bytes.fromhex(document["signature"])
        raw_public = ed25519_public_raw(document["public_key"])
        public = Ed25519PublicKey.from_public_bytes(raw_public)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"signature of {where} is malformed: {exc}") from None
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
    return SignedModule(mrenclave, signer_id(raw_public), config, digest)
