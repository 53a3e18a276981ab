"""The guest side of the KBS protocol: attest to a key broker and fetch one secret.

Runs inside a container's init, so it imports only the stdlib at module level; ``cryptography`` and
``joserfc`` are imported when a secret is fetched. HTTP is the stdlib's ``http.client`` over ``ssl``.

    secret = fetch_resource("https://kbs:8080", "default/key/db", attest, ca_file="kbs-ca.pem")

where ``attest(report_data)`` returns ``(tee_name, evidence_bytes)`` with ``report_data`` bound in the evidence.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any

from clave.kbs import protocol

Attest = Callable[[bytes], tuple[str, bytes]]
MAX_RESPONSE_BYTES = 16 << 20


class KbsError(Exception):
    """Fetching a resource failed; ``str()`` is one line, with the KBS's RFC 7807 title and detail if any."""

    def __init__(self, message: str, status: int | None = None, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


def parse_resource(resource: str) -> tuple[str, str, str]:
    """``repo/type/tag`` (or ``kbs:///repo/type/tag``) as its three components."""
    path = resource.removeprefix("kbs:///").strip("/")
    parts = path.split("/")
    if len(parts) != 3 or not all(parts):
        raise KbsError(f"resource {resource!r} is not repo/type/tag")
    return parts[0], parts[1], parts[2]


class _Tunnelled(http.client.HTTPSConnection):
    """HTTPS over a stream the caller opens (a vm guest's tunnel to the broker): TLS end to end all the same."""

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext,
                 open_stream: Callable[[], socket.socket]) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._open_stream = open_stream
        self._tls = context

    def connect(self) -> None:
        self.sock = self._tls.wrap_socket(self._open_stream(), server_hostname=self.host)


class Connection:
    """One keep-alive HTTPS connection to the KBS, carrying the session cookie; ``open_stream`` (a tunnel to the
    broker) instead of a TCP connection to the url's host."""

    def __init__(self, url: str, ca_file: str | None, timeout: float,
                 open_stream: Callable[[], socket.socket] | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise KbsError(f"KBS url {url!r} must be https://host[:port]")
        context = ssl.create_default_context(cafile=ca_file)
        self.base = parsed.path.rstrip("/")
        self.conn: http.client.HTTPSConnection
        if open_stream is not None:
            self.conn = _Tunnelled(parsed.hostname, parsed.port or 443, timeout, context, open_stream)
        else:
            self.conn = http.client.HTTPSConnection(parsed.hostname, parsed.port or 443, timeout=timeout,
                                                    context=context)
        self.cookie: str | None = None
        self.url = url

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
        send_headers = {"Accept": "application/json"}
        data = None
        if isinstance(body, bytes):
            data = body
            send_headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            data = json.dumps(body).encode()
            send_headers["Content-Type"] = "application/json"
        if self.cookie:
            send_headers["Cookie"] = f"{protocol.SESSION_COOKIE}={self.cookie}"
        send_headers.update(headers or {})
        try:
            self.conn.request(method, self.base + path, body=data, headers=send_headers)
            response = self.conn.getresponse()
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        except ssl.SSLError as exc:
            raise KbsError(f"TLS with KBS {self.url} failed: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise KbsError(f"KBS {self.url} unreachable: {exc or type(exc).__name__}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise KbsError(f"KBS answer to {method} {path} exceeds {MAX_RESPONSE_BYTES} bytes")
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            if name.strip() == protocol.SESSION_COOKIE:
                self.cookie = rest.split(";", 1)[0].strip()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
            if response.status == 200:
                raise KbsError(f"KBS answer to {method} {path} is not JSON") from None
        if response.status != 200:
            raise _problem_error(method, path, response.status, payload)
        return response.status, payload

    def close(self) -> None:
        self.conn.close()


def _problem_error(method: str, path: str, status: int, payload: Any) -> KbsError:
    step = path.removeprefix(protocol.PREFIX)
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
        title = payload.get("title") or protocol.problem_title(str(payload.get("type", "")))
        return KbsError(f"KBS refused {method} {step} ({status} {title}): {payload['detail']}", status, payload)
    return KbsError(f"KBS refused {method} {step} with HTTP {status}", status)


def _tee_key() -> tuple[Any, dict[str, str]]:
    """An ephemeral P-256 key pair and its public JWK as ``kbs_types::TeePubKey::EC`` (kty, crv, alg, x, y)."""
    from joserfc.jwk import ECKey

    key = ECKey.generate_key(protocol.TEE_KEY_CURVE, private=True)
    public = key.as_dict(private=False)
    jwk = {"kty": "EC", "crv": protocol.TEE_KEY_CURVE, "alg": protocol.TEE_KEY_ALG,
           "x": str(public["x"]), "y": str(public["y"])}
    return key, jwk


def preload() -> None:
    """Import everything ``fetch_resource`` needs, for a caller that loses the file system before it fetches (a
    container's init after pivot_root): one JWE round trip under a throwaway key loads joserfc's and
    cryptography's lazily imported parts."""
    from joserfc import jwe

    key, _ = _tee_key()
    token = jwe.encrypt_compact({"alg": protocol.TEE_KEY_ALG, "enc": protocol.CONTENT_ENC}, b"preload", key)
    jwe.decrypt_compact(token, key, algorithms=[protocol.TEE_KEY_ALG, protocol.CONTENT_ENC])
    ssl.create_default_context()
    "kbs.example".encode("idna")  # http.client encodes host names with the idna codec


def decrypt_response(response: Any, key: Any) -> bytes:
    """The plaintext of a resource ``Response`` (flattened JWE) under the TEE private key."""
    from joserfc import jwe
    from joserfc.errors import JoseError

    try:
        compact = protocol.response_to_jwe(response)
        decrypted = jwe.decrypt_compact(
            compact, key, algorithms=[protocol.TEE_KEY_ALG, protocol.CONTENT_ENC]
        )
    except (ValueError, JoseError) as exc:
        raise KbsError(f"KBS resource response does not decrypt under the TEE key: {exc}") from None
    if decrypted.plaintext is None:
        raise KbsError("KBS resource response has no plaintext")
    return decrypted.plaintext


def fetch_resource(url: str, resource: str, attest: Attest, *, ca_file: str | None = None, timeout: float = 10.0,
                   tee: str | None = None, open_stream: Callable[[], socket.socket] | None = None) -> bytes:
    """Run auth → attest → resource against the KBS at ``url`` and return the decrypted secret.

    ``attest(report_data)`` must return ``(tee_name, evidence)`` with ``report_data`` (at most 64 bytes: the
    digest of the runtime data) bound in the evidence. ``tee``, when known beforehand, is declared in the
    auth request; otherwise the request declares ``auto`` and the evidence names its TEE (a Clave extension).
    Raises KbsError on any failure.
    """
    repo, kind, tag = parse_resource(resource)
    conn = Connection(url, ca_file, timeout, open_stream)
    try:
        request = {
            "version": protocol.PROTOCOL_VERSION,
            "tee": tee or "auto",
            "extra-params": {protocol.SUPPORTED_HASH_ALGORITHMS_KEY: list(protocol.HASH_ALGORITHMS)},
        }
        _, challenge = conn.request("POST", f"{protocol.PREFIX}/auth", request)
        if not isinstance(challenge, dict) or not isinstance(challenge.get("nonce"), str):
            raise KbsError("KBS challenge has no nonce")
        if conn.cookie is None:
            raise KbsError(f"KBS challenge set no {protocol.SESSION_COOKIE} cookie")
        extra = challenge.get("extra-params")
        algorithm = protocol.DEFAULT_HASH_ALGORITHM
        if isinstance(extra, dict) and extra.get(protocol.SELECTED_HASH_ALGORITHM_KEY):
            algorithm = str(extra[protocol.SELECTED_HASH_ALGORITHM_KEY]).lower()
        key, jwk = _tee_key()
        runtime_data = {"nonce": challenge["nonce"], "tee-pubkey": jwk}
        try:
            report_data = protocol.runtime_data_digest(runtime_data, algorithm)
        except ValueError as exc:
            raise KbsError(f"KBS challenge: {exc}") from None
        try:
            tee_name, evidence = attest(report_data)
        except KbsError:
            raise
        except Exception as exc:
            raise KbsError(f"attester failed: {exc}") from exc
        if tee is not None and tee_name != tee:
            raise KbsError(f"attester produced {tee_name} evidence, {tee} was declared")
        attestation = {
            "runtime-data": runtime_data,
            "tee-evidence": {"tee": tee_name, "evidence": base64.b64encode(evidence).decode()},
        }
        _, answer = conn.request("POST", f"{protocol.PREFIX}/attest", attestation)
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
            raise KbsError("KBS attest answer carries no token")
        path = "/".join(urllib.parse.quote(part, safe="") for part in (repo, kind, tag))
        _, response = conn.request("GET", f"{protocol.PREFIX}/resource/{path}")
        return decrypt_response(response, key)
    finally:
        conn.close()
