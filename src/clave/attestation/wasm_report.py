"""Local reports of the WebAssembly enclave runtime. INSECURE: software only, signed by a host key.

A report binds the enclave identity (mrenclave, mrsigner) to 64 bytes of caller data, as an SGX report does,
but the signer is a host "platform" key (Ed25519, generated once at /var/lib/clave/wasm-platform-key.pem;
``CLAVE_WASM_PLATFORM_KEY`` overrides the path). Whoever controls the host can forge it: a verifier must know
the platform public key out of band, and even then the report proves only what that host claims.

Format (the signature covers magic and body)::

    magic      8 bytes  b"CLVWASM\\x01"
    body       CBOR map {"version": 1, "mrenclave": bstr .size 32, "mrsigner": bstr .size 32,
                         "report_data": bstr .size 64, "target_info": bstr, "debug": false,
                         "platform_key": bstr .size 32 (raw Ed25519 public key)}
    signature  64 bytes Ed25519(platform key, magic || body)
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAGIC = b"CLVWASM\x01"
SIGNATURE_SIZE = 64
REPORT_DATA_SIZE = 64
VERSION = 1
DEFAULT_PLATFORM_KEY = "/var/lib/clave/wasm-platform-key.pem"
ENV_PLATFORM_KEY = "CLAVE_WASM_PLATFORM_KEY"
FIELDS: dict[str, type] = {
    "version": int, "mrenclave": bytes, "mrsigner": bytes, "report_data": bytes, "target_info": bytes,
    "debug": bool, "platform_key": bytes,
}


class ReportError(Exception):
    """A report is malformed or its signature does not verify; one line."""


def platform_key_path() -> str:
    return os.environ.get(ENV_PLATFORM_KEY) or DEFAULT_PLATFORM_KEY


def load_platform_key(path: str | None = None) -> Any:
    """The host platform key, created (0600, atomically) on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = path or platform_key_path()
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, path)  # first writer wins under concurrent first use
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return load_platform_key(path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ReportError(f"platform key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReportError(f"platform key {path}: not an Ed25519 key")
    return key


def platform_public_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | extra]) + value.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def encode_body(fields: dict[str, int | bytes | bool]) -> bytes:
    """CBOR for a map of text keys to unsigned ints, byte strings and booleans: all a report holds. Encoded
    here because the report is made after pivot_root, where cbor2 could no longer be imported."""
    out = [_cbor_head(5, len(fields))]
    for key, value in fields.items():
        name = key.encode()
        out.append(_cbor_head(3, len(name)) + name)
        if isinstance(value, bool):
            out.append(b"\xf5" if value else b"\xf4")
        elif isinstance(value, int):
            out.append(_cbor_head(0, value))
        else:
            out.append(_cbor_head(2, len(value)) + value)
    return b"".join(out)


def make_report(key: Any, mrenclave: bytes, mrsigner: bytes, report_data: bytes, target_info: bytes = b"") -> bytes:
    if len(report_data) > REPORT_DATA_SIZE:
        raise ValueError(f"report data is {len(report_data)} bytes, at most {REPORT_DATA_SIZE} fit")
    raw_public = key.public_key().public_bytes_raw()
    body = encode_body({
        "version": VERSION, "mrenclave": mrenclave, "mrsigner": mrsigner,
        "report_data": report_data.ljust(REPORT_DATA_SIZE, b"\0"), "target_info": target_info,
        "debug": False, "platform_key": raw_public,
    })
    signature: bytes = key.sign(MAGIC + body)
    return MAGIC + body + signature


def parse_report(report: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(fields, signed bytes, signature) of a report, format checked; the signature is NOT checked."""
    import cbor2

    if not report.startswith(MAGIC) or len(report) < len(MAGIC) + SIGNATURE_SIZE + 1:
        raise ReportError("not a wasm enclave report (bad magic or truncated)")
    signed, signature = report[:-SIGNATURE_SIZE], report[-SIGNATURE_SIZE:]
    try:
        fields = cbor2.loads(signed[len(MAGIC):])
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise ReportError(f"wasm report body is not CBOR: {exc}") from None
    if not isinstance(fields, dict) or set(fields) != set(FIELDS):
        raise ReportError(f"wasm report must hold exactly {sorted(FIELDS)}")
    for name, kind in FIELDS.items():
        if not isinstance(fields[name], kind) or (kind is int and isinstance(fields[name], bool)):
            raise ReportError(f"wasm report field {name!r} is not {kind.__name__}")
    if fields["version"] != VERSION:
        raise ReportError(f"wasm report version {fields['version']} is not supported")
    sizes = {"mrenclave": 32, "mrsigner": 32, "report_data": REPORT_DATA_SIZE, "platform_key": 32}
    for name, size in sizes.items():
        if len(fields[name]) != size:
            raise ReportError(f"wasm report field {name!r} is {len(fields[name])} bytes, not {size}")
    return fields, signed, signature


def check_signature(signed: bytes, signature: bytes, public_key: Any) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, signed)
    except InvalidSignature:
        raise ReportError("wasm report signature does not verify under the platform key") from None
