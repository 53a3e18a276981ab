"""clave-kbs end to end: broker processes on loopback over real TLS, the stdlib client, the admin CLI.

Evidence is what this machine can make: the ``sample`` attester and WASM enclave reports signed by a platform
key generated here (its public half is the broker's ``wasm_platform_key.pem`` collateral).
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kbs_env import MRENCLAVE, MRSIGNER, REPO, Kbs, Material, start_kbs, stop_kbs

from clave.attestation.attesters.sample import SampleAttester
from clave.attestation.wasm_report import make_report
from clave.kbs import protocol
from clave.kbs.client import Connection, KbsError, decrypt_response, fetch_resource
from clave.kbs.store import StateDir, write_private

for _dependency in ("joserfc", "starlette", "uvicorn"):  # clave-kbs's own (imported lazily by its modules)
    pytest.importorskip(_dependency, reason=f"clave-kbs needs {_dependency} (pip install {_dependency})")

SECRET = b"database password: correct horse battery staple"
Attest = Callable[[bytes], tuple[str, bytes]]


def sample(measurement: bytes | None = None) -> Attest:
    attester = SampleAttester(measurement) if measurement else SampleAttester()

    def attest(report_data: bytes) -> tuple[str, bytes]:
        return "sample", attester.attest(report_data).data

    return attest


def wasm(key: Ed25519PrivateKey, mrenclave: bytes = MRENCLAVE) -> Attest:
    def attest(report_data: bytes) -> tuple[str, bytes]:
        return "wasm", make_report(key, mrenclave, MRSIGNER, report_data)

    return attest


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "clave.kbs.cli", *args], capture_output=True, text=True, env=env,
                          timeout=30)


def admin_args(kbs: Kbs, key: Path | None = None) -> list[str]:
    return ["--url", kbs.url, "--ca-file", kbs.ca_file, "--admin-key", str(key or kbs.material.admin_private)]


def put_secret(kbs: Kbs, resource: str, data: bytes = SECRET) -> None:
    path = kbs.material.directory / f"secret-{resource.replace('/', '_')}"
    path.write_bytes(data)
    result = cli("put-resource", *admin_args(kbs), resource, str(path))
    assert result.returncode == 0, result.stderr


def fetch(kbs: Kbs, resource: str, attest: Attest) -> bytes:
    return fetch_resource(kbs.url, resource, attest, ca_file=kbs.ca_file, timeout=10)


def refusal(kbs: Kbs, resource: str, attest: Attest) -> KbsError:
    with pytest.raises(KbsError) as caught:
        fetch(kbs, resource, attest)
    return caught.value


class Session:
    """The protocol step by step, for the refusals the client would never provoke itself."""

    def __init__(self, kbs: Kbs, tee: str = "sample") -> None:
        self.conn = Connection(kbs.url, kbs.ca_file, 10)
        request = {"version": protocol.PROTOCOL_VERSION, "tee": tee, "extra-params": ""}
        _, self.challenge = self.conn.request("POST", f"{protocol.PREFIX}/auth", request)
        from joserfc.jwk import ECKey

        self.key = ECKey.generate_key("P-256", private=True)
        public = self.key.as_dict(private=False)
        self.jwk = {"kty": "EC", "crv": "P-256", "alg": protocol.TEE_KEY_ALG, "x": public["x"], "y": public["y"]}
        self.runtime_data = {"nonce": self.challenge["nonce"], "tee-pubkey": self.jwk}
        assert self.challenge["extra-params"] == {"selected-hash-algorithm": "sha384"}

    def report_data(self) -> bytes:
        return protocol.runtime_data_digest(self.runtime_data, "sha384")

    def attest(self, evidence: bytes, runtime_data: dict[str, Any] | None = None, tee: str = "sample") -> Any:
        body = {"runtime-data": runtime_data or self.runtime_data,
                "tee-evidence": {"tee": tee, "evidence": base64.b64encode(evidence).decode()}}
        return self.conn.request("POST", f"{protocol.PREFIX}/attest", body)[1]

    def get(self, resource: str, headers: dict[str, str] | None = None) -> Any:
        return self.conn.request("GET", f"{protocol.PREFIX}/resource/{resource}", None, headers)[1]

    def close(self) -> None:
        self.conn.close()


def refused(call: Callable[[], Any]) -> KbsError:
    with pytest.raises(KbsError) as caught:
        call()
    return caught.value


# --- accepted ----------------------------------------------------------------------------------------------------


def test_sample_evidence_gets_the_secret_and_audit_says_released(kbs: Kbs) -> None:
    put_secret(kbs, "default/key/db")
    assert fetch(kbs, "default/key/db", sample()) == SECRET
    released = [line for line in kbs.audit() if line["outcome"] == "released"]
    assert released and released[-1]["resource"] == "default/key/db"
    assert released[-1]["tee"] == "sample" and released[-1]["insecure"] is True
    assert released[-1]["measurement"] == SampleAttester().measurement.hex()
    assert str(released[-1]["claims_digest"]).startswith("sha256:")
    assert stat.S_IMODE((kbs.state / "resources/default/key/db").stat().st_mode) == 0o600
    assert stat.S_IMODE((kbs.state / "audit.log").stat().st_mode) == 0o600


def test_wasm_enclave_report_gets_the_secret(kbs: Kbs) -> None:
    put_secret(kbs, "default/key/wasm", b"wasm secret")
    assert fetch(kbs, "default/key/wasm", wasm(kbs.material.wasm_key)) == b"wasm secret"


def test_token_carries_claims_and_works_as_bearer_without_cookie(kbs: Kbs) -> None:
    put_secret(kbs, "default/key/bearer", b"via token")
    session = Session(kbs)
    token = session.attest(SampleAttester().attest(session.report_data()).data)["token"]
    session.close()
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "==")) for part in token.split(".")[:2])
    assert header["alg"] == "ES256"
    assert claims["tee"] == "sample" and claims["insecure"] is True
    assert claims["tee-pubkey"] == session.jwk
    assert claims["tcb-status"]["measurement"] == SampleAttester().measurement.hex()
    assert claims["exp"] > time.time() and claims["iss"] == "clave-kbs"
    fresh = Connection(kbs.url, kbs.ca_file, 10)  # no cookie: the token alone
    try:
        _, response = fresh.request("GET", f"{protocol.PREFIX}/resource/default/key/bearer", None,
                                    {"Authorization": f"Bearer {token}"})
        assert set(response) == set(protocol.RESPONSE_FIELDS)
        protected = json.loads(base64.urlsafe_b64decode(response["protected"] + "=="))
        assert protected["alg"] == "ECDH-ES+A256KW" and protected["enc"] == "A256GCM"
        assert list(protected["epk"]) == sorted(protected["epk"])  # as serde_json writes it (AAD rebuild)
        assert decrypt_response(response, session.key) == b"via token"
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        error = refused(lambda: fresh.request("GET", f"{protocol.PREFIX}/resource/default/key/bearer", None,
                                              {"Authorization": f"Bearer {forged}"}))
        assert error.status == 401 and "evidence signature" in str(error)
    finally:
        fresh.close()


# --- refusals, each naming its layer -----------------------------------------------------------------------------


def test_wrong_measurement_is_refused_by_policy(kbs: Kbs) -> None:
    put_secret(kbs, "default/key/measured")
    error = refusal(kbs, "default/key/measured", sample(hashlib.sha256(b"another app").digest()))
    assert error.status == 403 and error.problem["title"] == "PolicyDeny"
    assert "policy: default/key/measured denied" in str(error) and "measurement" in str(error)
    error = refusal(kbs, "default/key/measured", wasm(kbs.material.wasm_key, bytes(32)))
    assert error.status == 403 and "mrenclave" in str(error)


def test_modified_evidence_is_refused(kbs: Kbs) -> None:
    def tampered(report_data: bytes) -> tuple[str, bytes]:
        data = bytearray(SampleAttester().attest(report_data).data)
        data[20] ^= 0x01  # inside the CBOR body, covered by the MAC
        return "sample", bytes(data)

    error = refusal(kbs, "default/key/db", tampered)
    assert error.status == 401 and error.problem["title"] == "AttestationError"
    assert "evidence refused: evidence signature" in str(error)


def test_report_signed_by_an_unknown_platform_key_is_refused(kbs: Kbs) -> None:
    error = refusal(kbs, "default/key/wasm", wasm(Ed25519PrivateKey.generate()))
    assert error.status == 401 and "evidence signature: wasm report is signed by another platform key" in str(error)


def test_replayed_nonce_is_refused(kbs: Kbs) -> None:
    session = Session(kbs)
    evidence = SampleAttester().attest(session.report_data()).data
    assert "token" in session.attest(evidence)
    error = refused(lambda: session.attest(evidence))
    assert error.status == 401 and "freshness: nonce already used" in str(error)
    session.close()
    # the same answer replayed in a new session carries the old nonce
    other = Session(kbs)
    error = refused(lambda: other.attest(evidence, session.runtime_data))
    assert "freshness: runtime-data nonce is not this session's challenge" in str(error)
    other.close()


def test_evidence_not_bound_to_the_session_key_is_refused(kbs: Kbs) -> None:
    session = Session(kbs)
    attacker = dict(session.jwk, x=Session.__name__)  # evidence made for another key
    unbound = protocol.runtime_data_digest({"nonce": session.challenge["nonce"], "tee-pubkey": attacker})
    error = refused(lambda: session.attest(SampleAttester().attest(unbound).data))
    assert error.status == 401 and "evidence refused: key binding" in str(error)
    session.close()


def test_policy_denies_an_uncovered_resource_and_a_foreign_tee(kbs: Kbs) -> None:
    put_secret(kbs, "other/key/db")
    error = refusal(kbs, "other/key/db", sample())
    assert error.status == 403 and "policy: no policy entry covers other/key/db (default deny)" in str(error)


def test_missing_resource_is_not_found_after_policy(kbs: Kbs) -> None:
    error = refusal(kbs, "default/key/absent", sample())
    assert error.status == 404 and error.problem["title"] == "ResourceNotFound"


def test_malformed_requests_are_refused(kbs: Kbs) -> None:
    conn = Connection(kbs.url, kbs.ca_file, 10)
    try:
        error = refused(lambda: conn.request("POST", f"{protocol.PREFIX}/auth", b"{not json"))
        assert error.status == 400 and "evidence format: request body is not JSON" in str(error)
        error = refused(lambda: conn.request("POST", f"{protocol.PREFIX}/auth", {"version": "0.0.1", "tee": "sgx"}))
        assert error.status == 401 and "KBS protocol version '0.0.1' is not supported" in str(error)
        error = refused(lambda: conn.request("POST", f"{protocol.PREFIX}/auth",
                                             {"version": protocol.PROTOCOL_VERSION, "tee": "nope"}))
        assert error.status == 400 and "tee 'nope'" in str(error)
        error = refused(lambda: conn.request("GET", f"{protocol.PREFIX}/resource/default/key/..x%00"))
        assert error.status == 400 and "resource component" in str(error)
        error = refused(lambda: conn.request("GET", f"{protocol.PREFIX}/resource/default/key/db"))
        assert error.status == 401 and "no attested session cookie" in str(error)
        error = refused(lambda: conn.request("GET", f"{protocol.PREFIX}/nowhere"))
        assert error.status == 404 and error.problem["type"].endswith("/NotFound")
        error = refused(lambda: conn.request("POST", f"{protocol.PREFIX}/auth", b"[" * (5 << 20)))
        assert error.status == 413 and "request body exceeds" in str(error)
    finally:
        conn.close()
    session = Session(kbs)
    error = refused(lambda: session.conn.request("POST", f"{protocol.PREFIX}/attest", {"tee-evidence": {}}))
    assert error.status == 400 and "Attestation: runtime-data must be an object" in str(error)
    session.close()
    session = Session(kbs)
    error = refused(lambda: session.attest(b"garbage"))
    assert error.status == 401 and "evidence refused: evidence format" in str(error)
    session.close()
    refusals = [line for line in kbs.audit() if line["outcome"] == "refused"]
    assert any("not JSON" in str(line["reason"]) for line in refusals)


def test_expired_session_and_expired_token_are_refused(short_kbs: Kbs) -> None:
    put_secret(short_kbs, "default/key/db")
    session = Session(short_kbs)
    time.sleep(1.2)
    error = refused(lambda: session.attest(SampleAttester().attest(session.report_data()).data))
    assert error.status == 401 and "freshness: session expired" in str(error)
    session.close()
    session = Session(short_kbs)
    token = session.attest(SampleAttester().attest(session.report_data()).data)["token"]
    time.sleep(1.2)
    error = refused(lambda: session.get("default/key/db"))
    assert "freshness: session expired; attest again" in str(error)
    error = refused(lambda: session.get("default/key/db", {"Authorization": f"Bearer {token}"}))
    assert error.status == 401 and "freshness: attestation token expired" in str(error)
    session.close()


def test_insecure_evidence_is_refused_without_allow_insecure(strict_kbs: Kbs) -> None:
    put_secret(strict_kbs, "default/key/db")
    for attest in (sample(), wasm(strict_kbs.material.wasm_key)):
        error = refusal(strict_kbs, "default/key/db", attest)
        assert error.status == 401 and "policy:" in str(error) and "INSECURE" in str(error)
        assert "--allow-insecure" in str(error)
    lines = [line for line in strict_kbs.audit() if line["event"] == "attest"]
    assert {line["tee"] for line in lines} == {"sample", "wasm"}
    assert all(line["outcome"] == "refused" and "INSECURE" in str(line["reason"]) for line in lines)


# --- admin API -----------------------------------------------------------------------------------------------------


def test_admin_api_refuses_missing_and_wrong_keys(kbs: Kbs) -> None:
    secret = kbs.material.directory / "admin-secret"
    secret.write_bytes(b"x")
    result = cli("put-resource", *admin_args(kbs, kbs.material.other_admin_private), "default/key/evil", str(secret))
    assert result.returncode == 1
    assert "401 AdminAuthAccess" in result.stderr and "does not verify under the admin public key" in result.stderr
    conn = Connection(kbs.url, kbs.ca_file, 10)
    try:
        error = refused(lambda: conn.request("POST", f"{protocol.PREFIX}/resource/default/key/evil", b"x"))
        assert error.status == 401 and "no Authorization: Bearer" in str(error)
        error = refused(lambda: conn.request("POST", f"{protocol.PREFIX}/resource-policy", {"policy": ""},
                                             {"Authorization": "Bearer not.a.jwt"}))
        assert error.status == 401 and "admin access denied" in str(error)
    finally:
        conn.close()
    assert not (kbs.state / "resources/default/key/evil").exists()
    admin_refusals = [line for line in kbs.audit() if line["event"] == "admin" and line["outcome"] == "refused"]
    assert len(admin_refusals) >= 3


def test_admin_sets_policy_and_deletes_resources(kbs: Kbs, material: Material) -> None:
    put_secret(kbs, "team/cfg/app", b"team config")
    assert "no policy entry covers team/cfg/app" in str(refusal(kbs, "team/cfg/app", sample()))
    policy = json.loads(material.policy.read_text())
    policy["team/*/app"] = [{"tee": ["wasm"]}, {"tee": ["sample"], "min_svn": {"svn": 1}}]
    path = material.directory / "policy-team.json"
    path.write_text(json.dumps(policy))
    result = cli("set-policy", *admin_args(kbs), str(path))
    assert result.returncode == 0, result.stderr
    assert fetch(kbs, "team/cfg/app", sample()) == b"team config"
    shown = cli("get-policy", *admin_args(kbs))
    assert shown.returncode == 0 and json.loads(shown.stdout)["team/*/app"][1]["min_svn"] == {"svn": 1}
    bad = material.directory / "policy-bad.json"
    bad.write_text(json.dumps({"team/app": [{}]}))
    result = cli("set-policy", *admin_args(kbs), str(bad))
    assert result.returncode == 2 and "not repo/type/tag" in result.stderr
    assert cli("delete-resource", *admin_args(kbs), "team/cfg/app").returncode == 0
    assert refusal(kbs, "team/cfg/app", sample()).status == 404
    result = cli("set-policy", *admin_args(kbs), str(material.policy))  # restore for the other tests
    assert result.returncode == 0, result.stderr


def test_admin_api_is_off_without_admin_pubkey_and_keygen_makes_a_pair(material: Material, tmp_path: Path) -> None:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    assert cli("keygen", str(private), str(public)).returncode == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert cli("keygen", str(private), str(public)).returncode == 2  # never overwrites a key
    server = start_kbs(material, tmp_path / "state", "--allow-insecure", admin=False)
    try:
        result = cli("put-resource", *admin_args(server, private), "default/key/x", str(public))
        assert result.returncode == 1 and "admin API disabled" in result.stderr
    finally:
        stop_kbs(server)
    fresh = material.directory / "fresh-admin.pub"
    fresh.write_bytes(public.read_bytes())
    server = start_kbs(material, tmp_path / "state2", "--allow-insecure", "--admin-pubkey", str(fresh), admin=False)
    try:  # the pair keygen made is accepted by a KBS given its public half
        result = cli("put-resource", *admin_args(server, private), "default/key/x", str(public))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "state2/resources/default/key/x").read_bytes() == public.read_bytes()
    finally:
        stop_kbs(server)


# --- wire facts and storage ----------------------------------------------------------------------------------------


def test_runtime_data_is_hashed_as_serde_json_writes_it() -> None:
    runtime_data = {"tee-pubkey": {"kty": "EC", "y": "b", "x": "a", "crv": "P-256", "alg": "ECDH-ES+A256KW"},
                    "nonce": "bm9uY2U="}
    text = b'{"nonce":"bm9uY2U=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"a","y":"b"}}'
    assert protocol.canonical_json(runtime_data) == text
    assert protocol.runtime_data_digest(runtime_data) == hashlib.sha384(text).digest()
    assert len(protocol.runtime_data_digest(runtime_data, "sha512")) == 64
    with pytest.raises(ValueError):
        protocol.runtime_data_digest(runtime_data, "md5")


def test_response_shape_round_trips_and_rejects_unprotected_headers() -> None:
    compact = "aGVhZGVy.a2V5.aXY.Y2lwaGVy.dGFn"
    response = protocol.jwe_to_response(compact)
    assert list(response) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
    assert protocol.response_to_jwe(response) == compact
    with pytest.raises(ValueError):
        protocol.response_to_jwe(dict(response, header={"epk": {}}))


def test_state_writes_are_private_and_atomic(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.put_resource("a/b/c", b"one")
    state.put_resource("a/b/c", b"two")
    path = tmp_path / "state/resources/a/b/c"
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["c"]  # no temp files left behind
    write_private(tmp_path / "x", b"y")
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o600
    assert state.token_key_pem() == state.token_key_pem()
    assert stat.S_IMODE(state.token_key_path.stat().st_mode) == 0o600


def test_client_refuses_a_kbs_whose_certificate_it_does_not_trust(kbs: Kbs) -> None:
    with pytest.raises(KbsError, match="TLS with KBS .* failed: CERTIFICATE_VERIFY_FAILED"):
        fetch_resource(kbs.url, "default/key/db", sample())  # system CAs only: the self-signed cert is unknown


def test_client_refuses_plain_http_and_bad_resource_names() -> None:
    with pytest.raises(KbsError, match="must be https"):
        fetch_resource("http://127.0.0.1:1", "a/b/c", sample())
    with pytest.raises(KbsError, match="is not repo/type/tag"):
        fetch_resource("https://127.0.0.1:1", "a/b", sample())


def test_client_module_imports_no_server_libraries() -> None:
    code = ("import sys, clave.kbs.client; "
            "bad = [m for m in ('uvicorn', 'starlette', 'joserfc', 'clave.attestation') if m in sys.modules]; "
            "print(bad)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "src")}, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_seal_wraps_to_rsa_oaep_keys_and_refuses_weak_ones() -> None:
    from joserfc.jwk import RSAKey

    from clave.kbs.server import Problem, seal

    key = RSAKey.generate_key(2048, private=True)
    jwk = dict(key.as_dict(private=False), alg="RSA-OAEP-256")
    response = seal(b"rsa secret", jwk)
    protected = json.loads(base64.urlsafe_b64decode(response["protected"] + "=="))
    assert protected == {"alg": "RSA-OAEP-256", "enc": "A256GCM"}
    from joserfc import jwe

    assert jwe.decrypt_compact(protocol.response_to_jwe(response), key,
                               algorithms=["RSA-OAEP-256", "A256GCM"]).plaintext == b"rsa secret"
    with pytest.raises(Problem, match="RSA1_5 is refused"):
        seal(b"x", dict(jwk, alg="RSA1_5"))
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(65537, 1024).public_key().public_numbers()
    small = {"kty": "RSA", "alg": "RSA-OAEP", "e": "AQAB",
             "n": base64.urlsafe_b64encode(numbers.n.to_bytes(128, "big")).decode().rstrip("=")}
    with pytest.raises(Problem, match="shorter than 2048"):
        seal(b"x", small)
