"""Signing WebAssembly enclave modules: Ed25519 keys in PEM and ``MODULE.wasm.sig`` documents.

A signature document is JSON::

    {"format": "clave-wasm-signature/1", "module_sha256": hex, "enclave_config": {...},
     "mrenclave": hex, "public_key": PEM, "signature": hex}

The signature is Ed25519 over ``SIGNED_DOMAIN || mrenclave``; since mrenclave covers the module digest and
the enclave config, it signs both. ``verify`` refuses a missing, malformed, tampered or badly signed
document with one line, and returns the signed enclave config and the signer's identity.

An app run by a language runtime is signed the same way over its app measurement (see ``measure``); its
document travels in the image as ``/.clave/enclave.sig`` (outside the measured tree)::

    {"format": "clave-wasm-app-signature/1", "manifest": {...}, "mrenclave": hex, "public_key": PEM,
     "signature": hex}

``verify_app`` compares the signed manifest with the one measured at load and names what differs.
"""

from __future__ import annotations

import binascii
import os

from clave import fastjson
from clave.enclave.wasm import measure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FORMAT = "clave-wasm-signature/1"
SIGNED_DOMAIN = b"clave-wasm-signature/1\0"
SIG_SUFFIX = ".sig"
APP_FORMAT = "clave-wasm-app-signature/1"
APP_SIGNATURE = ".clave/enclave.sig"  # in the image, relative to its root
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
        return binascii.a2b_base64("".join(text[start + len(begin):stop].split()), strict_mode=True)
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
    key: Any = load_private_key(key_path)
    with open(module_path, "rb") as f:
        digest = measure.module_digest(f.read())
    enclave_config = measure.check_config(config or measure.enclave_config(None))
    mrenclave = measure.mrenclave(digest, enclave_config)
    document = _signed_document(key, mrenclave, {
        "format": FORMAT, "module_sha256": digest.hex(), "enclave_config": enclave_config})
    path = signature_path(module_path)
    _write_document(path, document)
    return {"mrenclave": mrenclave.hex(), "mrsigner": signer_id(key.public_key().public_bytes_raw()).hex(),
            "sig": path}


def verify(module: bytes, signature_document: bytes | None, where: str) -> SignedModule:
    """Check a module against its signature document; ``where`` names the module in errors."""
    return verify_digest(measure.module_digest(module), signature_document, where)


def verify_digest(digest: bytes, signature_document: bytes | None, where: str) -> SignedModule:
    """``verify`` for a module given by its SHA-256 (hashed while streaming: large modules are not read
    into memory when their compiled form is cached)."""
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
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"signature of {where} is malformed: {exc}") from None
    if digest != signed_digest:
        raise SignatureError(f"{where} does not match its signature (module digest {digest.hex()[:16]}..., "
                             f"signed {signed_digest.hex()[:16]}...): the module was modified")
    mrenclave = measure.mrenclave(digest, config)
    if mrenclave != signed_mrenclave:
        raise SignatureError(f"signature of {where} is malformed: its mrenclave does not match its contents")
    raw_public = _check_signature(document, mrenclave, where)
    return SignedModule(mrenclave, signer_id(raw_public), config, digest)


def _signed_document(key: Any, mrenclave: bytes, fields: dict[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    public = key.public_key()
    return {
        **fields,
        "mrenclave": mrenclave.hex(),
        "public_key": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "signature": key.sign(SIGNED_DOMAIN + mrenclave).hex(),
    }


def _write_document(path: str, document: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(fastjson.dumps_indented(document, indent=" ") + "\n")
    os.replace(tmp, path)


def _check_signature(document: dict[str, Any], mrenclave: bytes, where: str) -> bytes:
    """Verify the document's Ed25519 signature over ``mrenclave``; returns the signer's raw public key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        signature = bytes.fromhex(document["signature"])
        raw_public = ed25519_public_raw(document["public_key"])
        public = Ed25519PublicKey.from_public_bytes(raw_public)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"signature of {where} is malformed: {exc}") from None
    try:
        public.verify(signature, SIGNED_DOMAIN + mrenclave)
    except InvalidSignature:
        raise SignatureError(f"signature of {where} does not verify: the signature was modified") from None
    return raw_public


def app_signature_path(rootfs: str) -> str:
    return os.path.join(rootfs, APP_SIGNATURE)


def sign_app(rootfs: str, manifest: dict[str, Any], key_path: str) -> dict[str, str]:
    """Sign an app's measured manifest; the document goes into the image as ``/.clave/enclave.sig``."""
    key: Any = load_private_key(key_path)
    mrenclave = measure.app_mrenclave(manifest)
    document = _signed_document(key, mrenclave, {"format": APP_FORMAT, "manifest": manifest})
    path = app_signature_path(rootfs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_document(path, document)
    return {"mrenclave": mrenclave.hex(), "mrsigner": signer_id(key.public_key().public_bytes_raw()).hex(),
            "sig": path}


MANIFEST_PARTS = {
    "runtime": "the language runtime", "runtime_sha256": "the language runtime's module",
    "tree_sha256": "the app's files", "args": "the arguments", "cwd": "the working directory",
    "env": "the PYTHON* environment", "enclave_config": "the enclave config (memory and CPU-time limits)",
}


def verify_app(manifest: dict[str, Any], signature_document: bytes | None, where: str) -> SignedModule:
    """Check an app's measured manifest against its signature document."""
    if signature_document is None:
        raise SignatureError(f"{where} is not signed (no /{APP_SIGNATURE} in the image): sign it with "
                             "'clave enclave sign --key KEY BUNDLE'")
    try:
        document = fastjson.loads(signature_document)
        if not isinstance(document, dict) or document.get("format") != APP_FORMAT:
            raise ValueError(f"format is not {APP_FORMAT}")
        signed = document["manifest"]
        signed_mrenclave = bytes.fromhex(document["mrenclave"])
        if not isinstance(signed, dict):
            raise ValueError("manifest is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"signature of {where} is malformed: {exc}") from None
    changed = [what for part, what in MANIFEST_PARTS.items() if signed.get(part) != manifest.get(part)]
    if changed:
        raise SignatureError(f"{where} does not match its signature: {', '.join(changed)} changed since it was "
                             f"signed (mrenclave {measure.app_mrenclave(manifest).hex()[:16]}..., signed "
                             f"{signed_mrenclave.hex()[:16]}...)")
    mrenclave = measure.app_mrenclave(manifest)
    if mrenclave != signed_mrenclave:
        raise SignatureError(f"signature of {where} is malformed: its mrenclave does not match its manifest")
    raw_public = _check_signature(document, mrenclave, where)
    return SignedModule(mrenclave, signer_id(raw_public), manifest["enclave_config"],
                        bytes.fromhex(manifest["runtime_sha256"]))


def signed_config(signature_document: bytes | None) -> dict[str, int | None] | None:
    """The enclave config an app was signed with (it fixes the limits, as a module's does), or None when the
    document is absent or unreadable (``verify_app`` then says why)."""
    if signature_document is None:
        return None
    try:
        return measure.check_config(fastjson.loads(signature_document)["manifest"]["enclave_config"])
    except (ValueError, KeyError, TypeError):
        return None
