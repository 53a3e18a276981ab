"""The broker's state directory: secrets, the resource policy, the token signing key and the audit log.

    STATE/resources/<repo>/<type>/<tag>   secret bytes (0600, written atomically)
    STATE/resource-policy.json            the resource policy last set (0600)
    STATE/token-key.pem                   ES256 key signing attestation tokens (0600, made on first start)
    STATE/audit.log                       one JSON line per release and per refusal (0600, append only)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

# Like trustee's resource URIs: letters, digits, '.', '_', '-'; never '.' or '..' alone.
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # fullmatch: "$" would let a final newline through


class StoreError(Exception):
    """A malformed resource name or an unusable state directory; one line."""


def check_resource(repo: str, kind: str, tag: str) -> str:
    """``repo/type/tag`` after checking each component is a safe file name."""
    for part in (repo, kind, tag):
        if not _COMPONENT.fullmatch(part) or part in (".", ".."):
            raise StoreError(f"resource component {part!r} must be 1-128 of [A-Za-z0-9_.-] and not . or ..")
    return f"{repo}/{kind}/{tag}"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (temp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDir:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.root / "resources").mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"state dir {self.root}: {exc.strerror}") from None
        self.policy_path = self.root / "resource-policy.json"
        self.token_key_path = self.root / "token-key.pem"
        self.audit_path = self.root / "audit.log"

    def _resource_path(self, resource: str) -> Path:
        return self.root / "resources" / resource

    def get_resource(self, resource: str) -> bytes | None:
        try:
            return self._resource_path(resource).read_bytes()
        except FileNotFoundError:
            return None

    def put_resource(self, resource: str, data: bytes) -> None:
        write_private(self._resource_path(resource), data)

    def delete_resource(self, resource: str) -> bool:
        try:
            self._resource_path(resource).unlink()
        except FileNotFoundError:
            return False
        return True

    def read_policy(self) -> bytes | None:
        try:
            return self.policy_path.read_bytes()
        except FileNotFoundError:
            return None

    def write_policy(self, text: bytes) -> None:
        write_private(self.policy_path, text)

    def token_key_pem(self) -> bytes:
        """The token signing key, made on first use (P-256, PKCS#8 PEM)."""
        try:
            return self.token_key_path.read_bytes()
        except FileNotFoundError:
            pass
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(self.token_key_path, pem)
        return pem


def claims_digest(claims: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def measurement_of(claims: dict[str, Any]) -> str | None:
    """The main measurement claim of the usual TEEs (SGX/wasm mrenclave, TDX mr_td, SNP/sample measurement)."""
    for name in ("mrenclave", "mr_td", "measurement"):
        value = claims.get(name)
        if isinstance(value, str):
            return value
    return None


class AuditLog:
    """Append-only JSON lines; one ``write`` per event, serialised by a lock, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def record(self, *, event: str, outcome: str, client: str | None, session: str | None = None,
               tee: str | None = None, resource: str | None = None, claims: dict[str, Any] | None = None,
               insecure: bool | None = None, reason: str | None = None) -> None:
        line: dict[str, Any] = {
            "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
            "outcome": outcome,
            "client": client,
            # the session id is a bearer credential while it lives: log a digest of it, never the id
            "session": hashlib.sha256(session.encode()).hexdigest()[:16] if session else None,
            "tee": tee,
            "resource": resource,
            "measurement": measurement_of(claims) if claims else None,
            "claims_digest": claims_digest(claims) if claims else None,
            "insecure": insecure,
            "reason": reason,
        }
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)

    def close(self) -> None:
        os.close(self._fd)
