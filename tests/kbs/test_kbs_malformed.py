"""clave-kbs answers every malformed request with a 4xx RFC 7807 problem JSON, never a 500 (docs/kbs.md).

Requests go over real HTTPS to a real broker process, as raw bytes, so nothing a client library would tidy up
(bodies, cookies, paths, headers) is out of reach.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from kbs_env import Kbs, Material

from clave.kbs import protocol

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

for _dependency in ("joserfc", "starlette", "uvicorn"):
    pytest.importorskip(_dependency, reason=f"clave-kbs needs {_dependency}")

P = protocol.PREFIX


class Raw:
    """One keep-alive HTTPS connection to the broker; ``send`` returns (status, headers, parsed body)."""

    def __init__(self, kbs: Kbs) -> None:
        self.host, self.port = urllib.parse.urlsplit(kbs.url).hostname, urllib.parse.urlsplit(kbs.url).port
        self.context = ssl.create_default_context(cafile=kbs.ca_file)
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPSConnection:
        assert self.host is not None
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=20)

    def send(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, Any]:
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()  # the server may close a connection after a refused request: one retry
                self.conn = self._connect()
                if attempt == 2:
                    raise
        if response.getheader("connection", "").lower() == "close":
            self.conn.close()
            self.conn = self._connect()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data
        return response.status, response.headers, parsed

    def close(self) -> None:
        self.conn.close()


def assert_problem(status: int, headers: http.client.HTTPMessage, body: Any, *, expect: int | None = None) -> None:
    """A 4xx answer whose body is RFC 7807 problem JSON agreeing with the status line."""
    assert 400 <= status < 500, f"status {status}: {body!r}"
    if expect is not None:
        assert status == expect, f"status {status}, expected {expect}: {body!r}"
    assert headers.get("content-type", "").startswith(protocol.PROBLEM_CONTENT_TYPE), headers.get("content-type")
    assert isinstance(body, dict), body
    assert body["status"] == status
    assert body["type"].startswith(protocol.ERROR_TYPE_PREFIX) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in body["detail"]


@pytest.fixture(scope="module")
def raw(kbs: Kbs) -> Iterator[Raw]:
    client = Raw(kbs)
    yield client
    client.close()


def admin_token(material: Material) -> str:
    from clave.kbs.admin import make_admin_token

    return make_admin_token(material.admin_private.read_bytes())


def session_cookie(raw: Raw) -> str:
    status, headers, body = raw.send("POST", f"{P}/auth", json.dumps(
        {"version": protocol.PROTOCOL_VERSION, "tee": "sample", "extra-params": ""}).encode())
    assert status == 200, body
    cookie = headers.get("set-cookie", "")
    assert cookie.startswith(protocol.SESSION_COOKIE + "="), cookie
    return cookie.split(";", 1)[0]


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body", [
    DEEP, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"\xff\xfe", b"1" * 5000, b"NaN", b"", b"null", b"[]", b'"x"',
    b'{"version": 1, "tee": "sample"}', b'{"version": "0.1.0", "tee": ["sample"]}',
    b'{"version": "0.1.0", "tee": "sample", "extra-params": {"supported-hash-algorithms": "sha384"}}',
    b'{"version": "0.1.0", "tee": "sample", "extra-params": [1, 2]}',
    b'{"version": "0.1.0", "tee": "\\ud800"}', b'{"version": "\\u0000", "tee": "sample"}',
], ids=lambda b: repr(b[:24]))
def test_malformed_auth_bodies_get_400s(raw: Raw, body: bytes) -> None:
    status, headers, problem = raw.send("POST", f"{P}/auth", body)
    assert_problem(status, headers, problem)


def test_deeply_nested_body_is_400_not_500(raw: Raw) -> None:
    for path in (f"{P}/auth", f"{P}/attest"):
        status, headers, problem = raw.send("POST", path, DEEP, {"cookie": session_cookie(raw)})
        assert_problem(status, headers, problem, expect=400)
        assert "nested too deeply" in problem["detail"]


@pytest.mark.parametrize("attest", [
    {}, [], {"runtime-data": "x", "tee-evidence": {}},
    {"runtime-data": {"nonce": 1, "tee-pubkey": {}}, "tee-evidence": {"tee": "sample", "evidence": "AA=="}},
    {"runtime-data": {"nonce": "n", "tee-pubkey": {"kty": ["EC"]}}, "tee-evidence": {"tee": "sample",
                                                                                      "evidence": "AA=="}},
    {"runtime-data": {"nonce": "n", "tee-pubkey": {"kty": "EC", "crv": "P-256", "x": 5, "y": None}},
     "tee-evidence": {"tee": "sample", "evidence": "AA=="}},
    {"runtime-data": {"nonce": "n", "tee-pubkey": {}}, "tee-evidence": {"tee": 7, "evidence": "%%%"}},
    {"runtime-data": {"nonce": "n", "tee-pubkey": {}}, "tee-evidence": {"tee": "sample", "evidence": ["AA"]}},
], ids=lambda d: json.dumps(d)[:40])
def test_malformed_attest_bodies_get_4xx(raw: Raw, attest: Any) -> None:
    status, headers, problem = raw.send("POST", f"{P}/attest", json.dumps(attest).encode(),
                                        {"cookie": session_cookie(raw)})
    assert_problem(status, headers, problem)


@pytest.mark.parametrize("name", [
    "default/key/db%0A", "default/key/db%0D%0A", "default%0A/key/db", "default/key/%00", "default/key/..",
    "default/key/" + "a" * 129, "default/key/%C3%A9", "default/key/%ED%A0%80", "default/%20/db",
])
def test_bad_resource_names_get_400(raw: Raw, name: str) -> None:
    status, headers, problem = raw.send("GET", f"{P}/resource/{name}")
    assert_problem(status, headers, problem, expect=400)


def test_an_escaped_slash_makes_a_path_no_route_has(raw: Raw) -> None:
    status, headers, problem = raw.send("GET", f"{P}/resource/default/key/a%2Fb")
    assert_problem(status, headers, problem, expect=404)


def test_trailing_newline_in_a_name_is_refused_by_the_store_check() -> None:
    from clave.kbs.store import StoreError, check_resource

    for part in ("db\n", "\ndb", "d\nb"):
        with pytest.raises(StoreError):
            check_resource("default", "key", part)
    assert check_resource("default", "key", "db") == "default/key/db"


@pytest.mark.parametrize("cookie", [
    f"{protocol.SESSION_COOKIE}=", f"{protocol.SESSION_COOKIE}=nonsense", f"{protocol.SESSION_COOKIE}={'x' * 4000}",
    f'{protocol.SESSION_COOKIE}="\\"', "garbage;;;=", f"{protocol.SESSION_COOKIE}=a; {protocol.SESSION_COOKIE}=b",
])
def test_bad_cookies_get_401(raw: Raw, cookie: str) -> None:
    for method, path in (("POST", f"{P}/attest"), ("GET", f"{P}/resource/default/key/db")):
        body = b"{}" if method == "POST" else None
        status, headers, problem = raw.send(method, path, body, {"cookie": cookie})
        assert_problem(status, headers, problem, expect=401)


@pytest.mark.parametrize("authorization", [
    "", "Bearer", "Bearer ", "Basic abc", "Bearer a.b.c", "Bearer " + "A" * 5000, "Bearer ..", "bearer \u00e9.x.y",
    "Bearer " + base64.urlsafe_b64encode(b'{"alg":"none"}').decode() + ".e30.",
])
def test_bad_admin_and_attestation_tokens_get_401(raw: Raw, authorization: str) -> None:
    headers = {"authorization": authorization} if authorization else {}
    for method, path, body in (("POST", f"{P}/resource-policy", b'{"policy": ""}'),
                               ("POST", f"{P}/resource/default/key/db", b"secret"),
                               ("GET", f"{P}/resource/default/key/db", None)):
        status, answer_headers, problem = raw.send(method, path, body, headers)
        assert_problem(status, answer_headers, problem, expect=401)


@pytest.mark.parametrize("body", [
    b"{", b"[]", b'{"policy": 1}', b'{"policy": "!!!"}',
    json.dumps({"policy": base64.b64encode(DEEP).decode()}).encode(),
    json.dumps({"policy": base64.b64encode(b'{"default/key/*": "x"}').decode()}).encode(),
    json.dumps({"policy": base64.b64encode(b"\xff").decode()}).encode(),
], ids=lambda b: repr(b[:24]))
def test_bad_policies_from_the_admin_get_400(raw: Raw, material: Material, body: bytes) -> None:
    status, headers, problem = raw.send("POST", f"{P}/resource-policy", body,
                                        {"authorization": "Bearer " + admin_token(material)})
    assert_problem(status, headers, problem, expect=400)


def test_huge_bodies_get_413(kbs: Kbs, raw: Raw) -> None:
    status, headers, problem = raw.send("POST", f"{P}/auth", b" " * (5 << 20))
    assert_problem(status, headers, problem, expect=413)
    liar = Raw(kbs)  # its connection is unusable afterwards: the server still waits for the declared bytes
    try:
        status, headers, problem = liar.send("POST", f"{P}/auth", b"{}", {"content-length": str(1 << 40)})
        assert_problem(status, headers, problem, expect=413)
    finally:
        liar.close()


# --- fuzz --------------------------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | \
    st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["version", "tee", "extra-params", "runtime-data", "tee-evidence", "nonce", "tee-pubkey",
                     "evidence", "kty", "crv", "x", "y", "policy"]) | st.text(max_size=8), inner, max_size=5),
    max_leaves=12)
_valid_auth = {"version": protocol.PROTOCOL_VERSION, "tee": "sample", "extra-params": ""}


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    """Bodies near the real shapes (a valid request with a field replaced, dropped or added), arbitrary JSON, or
    arbitrary bytes."""
    kind = draw(st.sampled_from(["mutated", "json", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.integers(min_value=500, max_value=20_000))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        return opener * depth
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    doc: dict[str, Any] = dict(_valid_auth)
    key = draw(st.sampled_from(sorted(doc) + ["runtime-data", "tee-evidence", "init-data"]))
    if draw(st.booleans()) and key in doc:
        del doc[key]
    else:
        doc[key] = draw(_json)
    return json.dumps(doc).encode()


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                    HealthCheck.data_too_large])
@given(body=_bodies(), endpoint=st.sampled_from(["auth", "attest", "resource-policy"]))
def test_fuzzed_bodies_never_get_a_500(raw: Raw, material: Material, body: bytes, endpoint: str) -> None:
    headers: dict[str, str] = {}
    if endpoint == "attest":
        headers["cookie"] = session_cookie(raw)
    elif endpoint == "resource-policy":
        headers["authorization"] = "Bearer " + admin_token(material)
    status, answer_headers, problem = raw.send("POST", f"{P}/{endpoint}", body, headers)
    if status == 200:  # a well-formed request the fuzzer happened to build (an auth, a policy)
        return
    assert_problem(status, answer_headers, problem)
