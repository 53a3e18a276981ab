"""The key broker: Confidential Containers' KBS protocol (RCAR) over HTTPS, evidence appraised by Clave's verifiers.

Endpoints (all under ``/kbs/v0``)::

    POST   /auth                              Request -> Challenge + cookie kbs-session-id
    POST   /attest                            Attestation -> {"token": <JWT>}       (cookie)
    GET    /resource/<repo>/<type>/<tag>      -> Response (JWE to the TEE key)     (cookie or Bearer token)
    POST   /resource/<repo>/<type>/<tag>      admin: body = the secret bytes
    DELETE /resource/<repo>/<type>/<tag>      admin
    POST   /resource-policy                   admin: {"policy": base64(resource policy JSON)}
    GET    /resource-policy                   admin: {"policy": base64(...)}

Every error is RFC 7807 problem JSON whose ``detail`` names the failing layer; every release and refusal is one
line of the audit log. Appraisal (CPU-bound) runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clave import fastjson
from clave.attestation.appraise import UnknownTee, appraise
from clave.attestation.base import Collateral, Layer, Roots, VerifyContext
from clave.attestation.policy import Policy, PolicyError
from clave.kbs import admin, protocol
from clave.kbs.policy import ResourcePolicy, verified_from_claims
from clave.kbs.store import AuditLog, StateDir, StoreError, check_resource

logger = logging.getLogger("clave.kbs")
MAX_BODY = 4 << 20
MAX_SESSIONS = 100_000
ISSUER = "clave-kbs"
# Verification only at /attest: every decision on claims (TCB status, debug, measurements) is the resource
# policy's, per resource, so a rule may admit what another refuses.
VERIFY_ONLY = Policy(allowed_tcb_status=("*",), allow_debug=True)


@dataclass
class Config:
    state: Path
    admin_pubkey: bytes | None = None
    collateral: Path | None = None
    roots: Path | None = None
    policy: bytes | None = None  # resource policy JSON given at start; overrides the stored one
    allow_insecure: bool = False
    session_ttl: float = 300.0


class Problem(Exception):
    """An RFC 7807 answer. ``kind`` is the problem type (trustee's error names where it has one)."""

    def __init__(self, status: int, kind: str, detail: str, *, event: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.event = event


def _layered(layer: Layer, why: str) -> str:
    return f"{layer.value}: {why}"


@dataclass
class Attested:
    tee: str
    claims: dict[str, Any]
    tee_pubkey: dict[str, Any]
    insecure: bool
    expires: float


@dataclass
class Session:
    id: str
    nonce: str
    tee: str  # as declared in the Request ("auto": the evidence names it)
    hash_algorithm: str
    expires: float
    nonce_used: bool = False
    attested: Attested | None = None


@dataclass
class Sessions:
    ttl: float
    _table: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pruned: float = 0.0  # when expired sessions were last dropped

    def create(self, tee: str, hash_algorithm: str) -> Session:
        session = Session(secrets.token_urlsafe(32), base64.b64encode(secrets.token_bytes(32)).decode(), tee,
                          hash_algorithm, time.time() + self.ttl)
        with self._lock:
            now = time.time()
            if len(self._table) >= MAX_SESSIONS or now - self._pruned > self.ttl:
                self._table = {k: s for k, s in self._table.items() if s.expires > now}
                self._pruned = now
            if len(self._table) >= MAX_SESSIONS:
                raise Problem(503, "TooManySessions", "too many live sessions; retry later")
            self._table[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            return self._table.get(session_id)

    def take_nonce(self, session: Session) -> bool:
        """Mark the session's nonce used; False if it already was (single use, atomically)."""
        with self._lock:
            if session.nonce_used:
                return False
            session.nonce_used = True
            return True


def _select_hash(extra_params: Any) -> str:
    """trustee's negotiation: the client lists ``supported-hash-algorithms``; sha384 unless it lacks it."""
    supported = extra_params.get(protocol.SUPPORTED_HASH_ALGORITHMS_KEY) if isinstance(extra_params, dict) else None
    if supported is None:
        return protocol.DEFAULT_HASH_ALGORITHM
    if not isinstance(supported, list):
        raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, "supported-hash-algorithms must be a list"))
    names = {str(s).lower() for s in supported}
    for candidate in (protocol.DEFAULT_HASH_ALGORITHM, "sha512", "sha256"):
        if candidate in names:
            return candidate
    raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, f"none of {sorted(names)} is a hash this KBS uses "
                                                  f"({', '.join(protocol.HASH_ALGORITHMS)})"))


def _import_tee_key(jwk: Any) -> Any:
    """The TEE public key of the runtime data as a joserfc key, checked to be one the protocol wraps to."""
    from joserfc.errors import JoseError
    from joserfc.jwk import RSAKey

    if not isinstance(jwk, dict):
        raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, "runtime-data.tee-pubkey is not a JWK object"))
    kty, alg = jwk.get("kty"), jwk.get("alg")
    try:
        if kty == "EC":
            if jwk.get("crv") != protocol.TEE_KEY_CURVE or alg not in (None, protocol.TEE_KEY_ALG):
                raise ValueError(f"EC tee-pubkey must be crv {protocol.TEE_KEY_CURVE}, alg {protocol.TEE_KEY_ALG}")
            return _sorted_ec_key_class().import_key({k: jwk[k] for k in ("kty", "crv", "x", "y") if k in jwk})
        if kty == "RSA":
            if alg not in ("RSA-OAEP", "RSA-OAEP-256"):
                raise ValueError("RSA tee-pubkey alg must be RSA-OAEP or RSA-OAEP-256 (RSA1_5 is refused)")
            modulus = base64.urlsafe_b64decode(str(jwk.get("n", "")) + "==")
            if int.from_bytes(modulus, "big").bit_length() < 2048:
                raise ValueError("RSA tee-pubkey is shorter than 2048 bits")
            return RSAKey.import_key({k: jwk[k] for k in ("kty", "n", "e") if k in jwk})
        raise ValueError(f"tee-pubkey kty {kty!r} is not EC or RSA")
    except (JoseError, ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, f"runtime-data.tee-pubkey: {exc}")) from None


@functools.cache
def _sorted_ec_key_class() -> Any:
    from joserfc.jwk import ECKey

    class SortedECKey(ECKey):  # type: ignore[misc]
        """Writes its JWK members sorted, so the ephemeral ``epk`` in the protected header reads as serde_json
        (which kbs-types clients use to rebuild the AEAD's additional data) writes it."""

        def as_dict(self, private: bool = False, **params: Any) -> dict[str, Any]:
            return dict(sorted(super().as_dict(private, **params).items()))

    return SortedECKey



def seal(plaintext: bytes, tee_pubkey: dict[str, Any]) -> dict[str, str]:
    """``plaintext`` as a kbs-types ``Response``: JWE (A256GCM) with the key wrapped to ``tee_pubkey``."""
    from joserfc import jwe

    key = _import_tee_key(tee_pubkey)
    alg = protocol.TEE_KEY_ALG if tee_pubkey.get("kty") == "EC" else str(tee_pubkey["alg"])
    compact = jwe.encrypt_compact({"alg": alg, "enc": protocol.CONTENT_ENC}, plaintext, key,
                                  algorithms=[alg, protocol.CONTENT_ENC])
    return protocol.jwe_to_response(compact)


def _problem_response(problem: Problem) -> Response:
    body = {
        "type": protocol.ERROR_TYPE_PREFIX + problem.kind,
        "title": problem.kind,
        "status": problem.status,
        "detail": problem.detail,
    }
    return JSONResponse(body, status_code=problem.status, media_type=protocol.PROBLEM_CONTENT_TYPE)


class Broker:
    def __init__(self, config: Config) -> None:
        from joserfc.jwk import ECKey

        self.config = config
        self.state = StateDir(config.state)
        self.audit = AuditLog(self.state.audit_path)
        self.sessions = Sessions(config.session_ttl)
        self.token_key = ECKey.import_key(self.state.token_key_pem())
        self.token_jwk = self.token_key.as_dict(private=False)
        self.admin_key = admin.load_public_key(config.admin_pubkey) if config.admin_pubkey else None
        self.collateral = Collateral(config.collateral)
        self.roots = Roots(config.roots)
        self._policy_lock = threading.Lock()
        if config.policy is not None:
            self.policy = ResourcePolicy.from_json(config.policy)
            self.state.write_policy(config.policy)
        else:
            stored = self.state.read_policy()
            self.policy = ResourcePolicy.from_json(stored) if stored is not None else ResourcePolicy()

    # --- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def client_of(request: Request) -> str | None:
        return f"{request.client.host}:{request.client.port}" if request.client else None

    @staticmethod
    async def read_body(request: Request) -> bytes:
        """The request body, refused past MAX_BODY before it is all in memory."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise Problem(413, "InvalidRequest", _layered(Layer.FORMAT, f"request body exceeds {MAX_BODY} bytes"))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise Problem(413, "InvalidRequest", _layered(Layer.FORMAT, f"request body exceeds {MAX_BODY} bytes"))
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(self, request: Request) -> Any:
        body = await self.read_body(request)
        try:
            return fastjson.loads(body)  # its errors (too deep, not UTF-8...) are all one-line ValueErrors
        except ValueError as exc:
            raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, f"request body is not JSON: {exc}")) from None

    def insecure_refusal(self, tee: str, insecure: bool) -> Problem | None:
        if (insecure or tee in protocol.INSECURE_TEES) and not self.config.allow_insecure:
            return Problem(401, "AttestationError", _layered(
                Layer.POLICY, f"{tee} evidence is INSECURE (no hardware-protected TEE behind it) and this KBS was "
                              "not started with --allow-insecure"))
        return None

    def issue_token(self, attested: Attested, warnings: list[str]) -> str:
        from joserfc import jwt

        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "iat": now,
            "exp": int(attested.expires),
            "jwk": self.token_jwk,
            "tee": attested.tee,
            "tee-pubkey": attested.tee_pubkey,
            "tcb-status": attested.claims,
            "insecure": attested.insecure,
            "evaluation-report": {"verifier": "clave", "warnings": warnings},
        }
        return jwt.encode({"alg": "ES256", "typ": "JWT"}, claims, self.token_key, algorithms=["ES256"])

    def verify_token(self, token: str) -> Attested:
        from joserfc import jwt
        from joserfc.errors import JoseError

        try:
            claims = dict(jwt.decode(token, self.token_key, algorithms=["ES256"]).claims)
        except (JoseError, ValueError) as exc:
            raise Problem(401, "TokenVerifierError", _layered(Layer.SIGNATURE, f"attestation token: {exc}")) from None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= time.time():
            raise Problem(401, "TokenVerifierError", _layered(Layer.FRESHNESS, "attestation token expired"))
        tee, body, pubkey = claims.get("tee"), claims.get("tcb-status"), claims.get("tee-pubkey")
        if claims.get("iss") != ISSUER or not isinstance(tee, str) or not isinstance(body, dict) \
                or not isinstance(pubkey, dict):
            raise Problem(401, "TokenVerifierError", _layered(Layer.FORMAT, "attestation token lacks KBS claims"))
        return Attested(tee, body, pubkey, bool(claims.get("insecure", True)), float(exp))

    # --- RCAR ----------------------------------------------------------------------------------------------

    async def auth(self, request: Request) -> Response:
        data = await self.json_body(request)
        if not isinstance(data, dict):
            raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, "Request must be a JSON object"))
        version, tee = data.get("version"), data.get("tee")
        if version != protocol.PROTOCOL_VERSION:
            raise Problem(401, "ProtocolVersion", _layered(
                Layer.FORMAT, f"KBS protocol version {version!r} is not supported (this KBS speaks "
                              f"{protocol.PROTOCOL_VERSION})"))
        if tee not in (*protocol.TEES, "auto"):
            raise Problem(400, "InvalidRequest", _layered(
                Layer.FORMAT, f"tee {tee!r} is not one of {', '.join(protocol.TEES)} (or auto)"))
        algorithm = _select_hash(data.get("extra-params"))
        session = self.sessions.create(tee, algorithm)
        response = JSONResponse({"nonce": session.nonce,
                                 "extra-params": {protocol.SELECTED_HASH_ALGORITHM_KEY: algorithm}})
        self._set_cookie(response, session)
        return response

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(protocol.SESSION_COOKIE, session.id, max_age=max(1, int(session.expires - time.time())),
                            path=protocol.PREFIX, secure=True, httponly=True, samesite="strict")

    async def attest(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(protocol.SESSION_COOKIE))
        if session is None:
            raise Problem(401, "SessionNotFound", _layered(
                Layer.FRESHNESS, f"no live session: POST {protocol.PREFIX}/auth first and send its cookie"))
        request.state.audit = {"session": session.id, "tee": session.tee}
        try:
            return await self._attest(request, session)
        except Problem as problem:
            problem.event = "attest"
            raise

    async def _attest(self, request: Request, session: Session) -> Response:
        if time.time() >= session.expires:
            raise Problem(401, "AttestationError", _layered(
                Layer.FRESHNESS, f"session expired (sessions live {self.config.session_ttl:g} s); start again at auth"))
        if not self.sessions.take_nonce(session):
            raise Problem(401, "AttestationError", _layered(
                Layer.FRESHNESS, "nonce already used: a session's challenge answers one attestation only"))
        data = await self.json_body(request)
        runtime_data, tee_evidence = self._parse_attestation(data)
        if runtime_data["nonce"] != session.nonce:
            raise Problem(401, "AttestationError", _layered(
                Layer.FRESHNESS, "runtime-data nonce is not this session's challenge"))
        tee = self._evidence_tee(session, tee_evidence)
        request.state.audit["tee"] = tee
        tee_key = runtime_data["tee-pubkey"]
        _import_tee_key(tee_key)
        try:
            evidence = base64.b64decode(tee_evidence["evidence"], validate=True)
        except (binascii.Error, ValueError):
            raise Problem(400, "InvalidRequest",
                          _layered(Layer.FORMAT, "tee-evidence.evidence is not base64")) from None
        gate = self.insecure_refusal(tee, False)
        if gate is not None:
            raise gate
        expected = protocol.runtime_data_digest(runtime_data, session.hash_algorithm)
        ctx = VerifyContext(collateral=self.collateral, roots=self.roots, expected_report_data=expected)
        try:
            verdict = await run_in_threadpool(appraise, evidence, tee=tee, ctx=ctx, policy=VERIFY_ONLY)
        except UnknownTee as exc:
            raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, str(exc))) from None
        if not verdict.accepted:
            raise Problem(401, "AttestationError", f"evidence refused: {verdict.reason}")
        insecure = verdict.insecure or tee in protocol.INSECURE_TEES
        gate = self.insecure_refusal(tee, insecure)
        if gate is not None:
            raise gate
        attested = Attested(tee, verdict.claims, tee_key, insecure, time.time() + self.config.session_ttl)
        token = self.issue_token(attested, verdict.warnings)
        session.attested = attested
        session.expires = attested.expires
        self.audit.record(event="attest", outcome="attested", client=self.client_of(request), session=session.id,
                          tee=tee, claims=verdict.claims, insecure=insecure)
        response = JSONResponse({"token": token})
        self._set_cookie(response, session)
        return response

    @staticmethod
    def _parse_attestation(data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        def bad(why: str) -> Problem:
            return Problem(400, "InvalidRequest", _layered(Layer.FORMAT, f"Attestation: {why}"))

        if not isinstance(data, dict):
            raise bad("must be a JSON object")
        if data.get("init-data") is not None:
            raise bad("init-data is not supported by this KBS (it cannot check an init-data digest)")
        runtime_data, tee_evidence = data.get("runtime-data"), data.get("tee-evidence")
        if not isinstance(runtime_data, dict) or not isinstance(runtime_data.get("nonce"), str) \
                or "tee-pubkey" not in runtime_data:
            raise bad("runtime-data must be an object with nonce and tee-pubkey")
        if not isinstance(tee_evidence, dict) or not isinstance(tee_evidence.get("evidence"), str):
            raise bad('tee-evidence must be {"tee": NAME, "evidence": BASE64}')
        return runtime_data, tee_evidence

    @staticmethod
    def _evidence_tee(session: Session, tee_evidence: dict[str, Any]) -> str:
        named = tee_evidence.get("tee")
        if named is not None and named not in protocol.TEES:
            raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, f"tee-evidence.tee {named!r} is unknown"))
        if session.tee == "auto":
            if named is None:
                raise Problem(400, "InvalidRequest", _layered(
                    Layer.FORMAT, "the Request declared tee auto: tee-evidence must name its tee"))
            return str(named)
        if named is not None and named != session.tee:
            raise Problem(401, "AttestationError", _layered(
                Layer.FORMAT, f"evidence is {named}, the session declared {session.tee}"))
        return session.tee

    async def resource(self, request: Request) -> Response:
        resource = self._resource_name(request)
        if request.method != "GET":
            return await self._admin_resource(request, resource)
        request.state.audit = {"resource": resource}
        attested, session_id = self._credentials(request)
        request.state.audit.update(session=session_id, tee=attested.tee, claims=attested.claims,
                                   insecure=attested.insecure)
        gate = self.insecure_refusal(attested.tee, attested.insecure)
        if gate is not None:
            gate.event = "resource"
            raise gate
        with self._policy_lock:
            policy = self.policy
        refusal = policy.refusal(resource, verified_from_claims(attested.tee, attested.claims))
        if refusal is not None:
            raise Problem(403, "PolicyDeny", _layered(Layer.POLICY, refusal), event="resource")
        secret = self.state.get_resource(resource)
        if secret is None:
            raise Problem(404, "ResourceNotFound", f"resource {resource} does not exist", event="resource")
        sealed = seal(secret, attested.tee_pubkey)
        self.audit.record(event="resource", outcome="released", client=self.client_of(request), session=session_id,
                          tee=attested.tee, resource=resource, claims=attested.claims, insecure=attested.insecure)
        return JSONResponse(sealed)

    def _credentials(self, request: Request) -> tuple[Attested, str | None]:
        authorization = request.headers.get("authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Problem(401, "TokenVerifierError", _layered(
                    Layer.FORMAT, "Authorization header is not 'Bearer <attestation token>'"), event="resource")
            try:
                return self.verify_token(token.strip()), None
            except Problem as problem:
                problem.event = "resource"
                raise
        session_id = request.cookies.get(protocol.SESSION_COOKIE)
        session = self.sessions.get(session_id)
        if session is None:
            raise Problem(401, "TokenNotFound", _layered(
                Layer.FRESHNESS, "no attested session cookie and no bearer attestation token"), event="resource")
        if session.attested is None:
            raise Problem(401, "TokenNotFound", _layered(
                Layer.FRESHNESS, "this session has not attested"), event="resource")
        if time.time() >= session.expires:
            raise Problem(401, "TokenNotFound", _layered(
                Layer.FRESHNESS, "session expired; attest again"), event="resource")
        return session.attested, session.id

    @staticmethod
    def _resource_name(request: Request) -> str:
        params = request.path_params
        try:
            return check_resource(params["repo"], params["kind"], params["tag"])
        except StoreError as exc:
            raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, str(exc)),
                          event="resource" if request.method == "GET" else "admin") from None

    # --- admin ---------------------------------------------------------------------------------------------

    def check_admin(self, request: Request) -> None:
        if self.admin_key is None:
            raise Problem(401, "AdminAuthAccess", "admin API disabled: the KBS was started without --admin-pubkey",
                          event="admin")
        try:
            admin.verify_admin_token(request.headers.get("authorization"), self.admin_key)
        except admin.AdminAuthError as exc:
            raise Problem(401, "AdminAuthAccess", f"admin access denied: {exc}", event="admin") from None

    async def _admin_resource(self, request: Request, resource: str) -> Response:
        request.state.audit = {"resource": resource}
        self.check_admin(request)
        if request.method == "DELETE":
            if not self.state.delete_resource(resource):
                raise Problem(404, "ResourceNotFound", f"resource {resource} does not exist", event="admin")
            outcome = "deleted"
        else:
            self.state.put_resource(resource, await self.read_body(request))
            outcome = "stored"
        self.audit.record(event="admin", outcome=outcome, client=self.client_of(request), resource=resource)
        return Response(status_code=200)

    async def resource_policy(self, request: Request) -> Response:
        request.state.audit = {"resource": "resource-policy"}
        self.check_admin(request)
        if request.method == "GET":
            stored = self.state.read_policy() or json.dumps(self.policy.to_dict()).encode()
            return JSONResponse({"policy": base64.urlsafe_b64encode(stored).decode().rstrip("=")})
        data = await self.json_body(request)
        encoded = data.get("policy") if isinstance(data, dict) else None
        if not isinstance(encoded, str):
            raise Problem(400, "InvalidRequest", _layered(Layer.FORMAT, 'body must be {"policy": BASE64}'),
                          event="admin")
        try:
            text = _b64decode_any(encoded)
            policy = ResourcePolicy.from_json(text)
        except (ValueError, PolicyError) as exc:
            raise Problem(400, "InvalidRequest", f"resource policy refused: {exc}", event="admin") from None
        self.state.write_policy(text)
        with self._policy_lock:
            self.policy = policy
        self.audit.record(event="admin", outcome="policy-set", client=self.client_of(request),
                          resource="resource-policy")
        return Response(status_code=200)


def _b64decode_any(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not (trustee's clients send URL-safe without padding)."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except binascii.Error:
        raise ValueError("policy is not base64") from None


def build_app(config: Config) -> Starlette:
    broker = Broker(config)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Problem as problem:
                refusal = problem
                outcome = "refused"
            except Exception as exc:  # never a bare 500 page: a problem answer, and an audit line
                logger.exception("clave-kbs: %s %s failed", request.method, request.url.path)
                refusal = Problem(500, "InternalError", f"internal error ({type(exc).__name__}); see the KBS log")
                outcome = "error"
            context = getattr(request.state, "audit", {})
            broker.audit.record(event=refusal.event or request.url.path.rsplit("/", 1)[-1], outcome=outcome,
                                client=broker.client_of(request), reason=refusal.detail, **context)
            return _problem_response(refusal)

        return endpoint

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(status, "InvalidRequest")
        detail = f"{request.method} {request.url.path}: {exc.detail if isinstance(exc, HTTPException) else exc}"
        return _problem_response(Problem(status, kind, detail))

    routes = [
        Route(f"{protocol.PREFIX}/auth", guarded(broker.auth), methods=["POST"]),
        Route(f"{protocol.PREFIX}/attest", guarded(broker.attest), methods=["POST"]),
        Route(f"{protocol.PREFIX}/resource/{{repo}}/{{kind}}/{{tag}}", guarded(broker.resource),
              methods=["GET", "POST", "DELETE"]),
        Route(f"{protocol.PREFIX}/resource-policy", guarded(broker.resource_policy), methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.broker = broker
    return app


def serve(config: Config, host: str, port: int, cert: str, key: str) -> None:
    """Serve the broker over HTTPS until interrupted."""
    import uvicorn

    app = build_app(config)
    uvicorn.run(app, host=host, port=port, ssl_certfile=cert, ssl_keyfile=key, log_level="warning",
                access_log=False, server_header=False, timeout_keep_alive=30)
