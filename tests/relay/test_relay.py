"""clave-relay and `clave-verify remote`, end to end across processes on loopback with real attested TLS:
real WebAssembly enclave containers run by `clave`, a relay process serving their evidence, the verifier CLI
judging it; then a compromised relay (tests/relay/_evil_relay.py) trying to make bad evidence pass."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_clave, swtpm_fixture

pytest.importorskip("wasmtime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "enclave"))
import _wasm_modules as wat  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attestation"))

from clave.attestation import tls  # noqa: E402
from clave.config.defaults import default_spec  # noqa: E402
from clave.relay import protocol  # noqa: E402

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root")


def sleeper(tag: str) -> str:
    """A guest that sleeps in poll_oneoff forever (no CPU burnt); ``tag`` makes its measurement distinct."""
    return f"""(module
 (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 512) "{tag}")
 (func (export "_start")
  (i32.store8 (i32.const 8) (i32.const 0))
  (i32.store (i32.const 16) (i32.const 1))
  (i64.store (i32.const 24) (i64.const 3600000000000))
  (loop $forever
   (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
   (br $forever))))"""


@dataclass
class Node:
    """A node: a private Clave state root with two running wasm enclave containers, "app" and "other"."""

    base: Path
    root: Path
    env: dict[str, str]
    reference: Path  # `clave enclave measure` of app's module
    collateral: Path  # holds the node's wasm platform public key
    measured: dict[str, str]

    def clave(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_clave(*args, root=self.root, cwd=cwd, env=self.env)


def _run_container(node: Node, name: str, key: Path) -> None:
    bundle = node.base / name
    wat.install(bundle / "rootfs", "/app/main.wasm", sleeper(name), key)
    config = default_spec()
    config["process"].update(terminal=False, args=["/app/main.wasm"])
    config["process"]["env"].append("ENCLAVE_TYPE=wasm")
    config["root"] = {"path": "rootfs", "readonly": True}
    (bundle / "config.json").write_text(json.dumps(config))
    result = node.clave("run", "--detach", name, cwd=bundle)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("node")
    env = {**os.environ, "CLAVE_WASM_PLATFORM_KEY": str(base / "platform-key.pem")}
    env.pop("CLAVE_WASM_TRUST_ON_FIRST_USE", None)
    node = Node(base, base / "state", env, base / "reference.json", base / "collateral", {})
    key = wat.make_key(base)
    try:
        for name in ("app", "other"):
            _run_container(node, name, key)
        measure = node.clave("enclave", "measure", str(base / "app/rootfs/app/main.wasm"))
        assert measure.returncode == 0, measure.stderr
        node.reference.write_text(measure.stdout)
        node.measured = json.loads(measure.stdout)
        from clave.attestation import wasm_report as report

        node.collateral.mkdir()
        public = report.platform_public_pem(report.load_platform_key(env["CLAVE_WASM_PLATFORM_KEY"]))
        (node.collateral / "wasm_platform_key.pem").write_bytes(public)
        yield node
    finally:
        for name in ("app", "other"):
            node.clave("delete", "--force", name)


class RelayProcess:
    def __init__(self, args: list[str], env: dict[str, str], listen: str = "127.0.0.1:0") -> None:
        self.log = tempfile.TemporaryFile("w+")  # a file: a pipe nobody reads could fill and block the relay
        self.proc = subprocess.Popen([sys.executable, *args, "--listen", listen], env=env,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("clave-relay: listening on "):
            self.stop()
            self.log.seek(0)
            raise AssertionError(f"relay did not start: {line!r} {self.log.read()}")
        self.line = line
        self.address = line.split()[3]

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.log.close()


@pytest.fixture(scope="module")
def relay(node: Node) -> Iterator[RelayProcess]:
    process = RelayProcess(["-m", "clave.relay.main", "--root", str(node.root), "--attester", "sample"], node.env)
    yield process
    assert process.stop() == 0  # SIGTERM is a clean stop


def evil_relay(node: Node, mode: str) -> RelayProcess:
    return RelayProcess([str(HERE / "_evil_relay.py"), mode, "--root", str(node.root)], node.env)


def verify(node: Node, address: str, *args: str, container: str = "app") -> tuple[int, dict, str]:
    result = subprocess.run(
        [str(BIN / "clave-verify"), "remote", address, "--container", container, "--json", *args],
        capture_output=True, text=True, timeout=60, env=node.env)
    return result.returncode, json.loads(result.stdout), result.stderr


def pinned(node: Node) -> list[str]:
    return ["--reference", str(node.reference), "--collateral", str(node.collateral)]


# ---------------------------------------------------------------- the honest path


def test_remote_verification_accepts_the_measured_container(node: Node, relay: RelayProcess) -> None:
    assert "attester sample, INSECURE" in relay.line
    code, verdict, stderr = verify(node, relay.address, *pinned(node))
    assert code == 0, verdict
    assert verdict["verdict"] == "accepted" and verdict["tee"] == "wasm" and verdict["container"] == "app"
    assert verdict["claims"]["mrenclave"] == node.measured["mrenclave"]
    assert verdict["claims"]["mrsigner"] == node.measured["mrsigner"]
    assert verdict["relay"]["verdict"] == "accepted" and verdict["relay"]["tee"] == "sample"
    assert verdict["insecure"] is True and "INSECURE" in stderr
    # The human form says the same and exits alike.
    human = subprocess.run([str(BIN / "clave-verify"), "remote", relay.address, "--container", "app",
                            *pinned(node)], capture_output=True, text=True, timeout=60, env=node.env)
    assert human.returncode == 0 and human.stdout.startswith("accepted: container app: wasm evidence")
    assert f'mrenclave: "{node.measured["mrenclave"]}"' in human.stdout


def test_report_data_binds_nonce_relay_session_and_container(node: Node, relay: RelayProcess) -> None:
    """Speak the richer form by hand and check what the container's own evidence carries."""
    nonce = os.urandom(32)
    host, port = relay.address.rsplit(":", 1)
    sock, peer = tls.connect((host, int(port)))
    with sock:
        sock.sendall(protocol.encode({"type": "GETEVIDENCE", "version": 1, "container": "app",
                                      "nonce": nonce.hex()}))
        reply = protocol.read_message(sock.recv, protocol.MAX_REPLY)
    from clave.attestation import ratls
    from clave.attestation import wasm_report as report

    assert reply["msgtype"] == "EVIDENCE" and reply["version"] == 1 and reply["container"] == "app"
    relay_key = protocol.relay_key_hash(ratls.spki_der(ratls.load_certificate(peer.certificate_der)))
    expected = protocol.container_report_data(nonce, relay_key, "app")
    fields, _, _ = report.parse_report(base64.b64decode(reply["evidence"]))
    assert fields["report_data"] == expected and expected[:32] == nonce
    assert reply["report_data"] == expected.hex()
    assert reply["mrenclave"] == fields["mrenclave"].hex() == node.measured["mrenclave"]
    assert reply["platform_key"].encode() == (node.collateral / "wasm_platform_key.pem").read_bytes()


def _ask(address: str, request: dict) -> dict:
    host, port = address.rsplit(":", 1)
    sock, _ = tls.connect((host, int(port)))
    with sock:
        sock.sendall(json.dumps(request).encode())
        return protocol.read_message(sock.recv, protocol.MAX_REPLY)


def test_inclavared_enclave_info_shape(node: Node, relay: RelayProcess) -> None:
    reply = _ask(relay.address, {"type": "GETENCLAVEINFO", "container": "app"})
    assert set(reply) == {"id", "msgtype", "version", "mrenclave", "mrsigner", "message"}
    assert reply["msgtype"] == "ENCLAVEINFO" and reply["version"] == 1
    assert reply["mrenclave"] == node.measured["mrenclave"] and reply["mrsigner"] == node.measured["mrsigner"]
    assert "container app" in reply["message"] and "INSECURE" in reply["message"]
    # inclavared's exact request names no container: with two running, the relay asks which.
    reply = _ask(relay.address, {"type": "GETENCLAVEINFO"})
    assert reply["msgtype"] == "ERROR" and "2 enclave containers (app, other)" in reply["message"]
    reply = _ask(relay.address, {"type": "HELLO"})
    assert reply["msgtype"] == "ERROR" and "unknown request type" in reply["message"]


def test_relay_refusals_are_one_line_errors(node: Node, relay: RelayProcess) -> None:
    code, verdict, _ = verify(node, relay.address, *pinned(node), container="nosuch")
    assert code == 1 and verdict["reason"] == "relay refused: no container nosuch on this node"
    reply = _ask(relay.address, {"type": "GETEVIDENCE", "container": "app", "nonce": "00"})
    assert reply["msgtype"] == "ERROR" and reply["message"] == "nonce must be 32 bytes, got 1"
    code, verdict, _ = verify(node, "127.0.0.1:1", *pinned(node))
    assert code == 1 and verdict["reason"].startswith("relay unavailable: cannot connect to 127.0.0.1:1")


def test_relay_on_a_unix_socket(node: Node, tmp_path: Path) -> None:
    path = str(tmp_path / "relay.sock")
    unix_relay = RelayProcess(["-m", "clave.relay.main", "--root", str(node.root), "--attester", "sample"],
                              node.env, listen=path)
    try:
        assert unix_relay.address == path
        code, verdict, _ = verify(node, path, *pinned(node))
        assert code == 0 and verdict["claims"]["container"] == "app"
    finally:
        assert unix_relay.stop() == 0
    assert not os.path.exists(path)  # removed on a clean stop


# ---------------------------------------------------------------- refusals by the verifier


def test_wrong_measurement_in_the_policy_is_refused(node: Node, relay: RelayProcess, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"reference_values": {"mrenclave": ["00" * 32]}}))
    code, verdict, _ = verify(node, relay.address, "--policy", str(policy), "--collateral", str(node.collateral))
    assert code == 1 and verdict["layer"] == "policy"
    assert verdict["reason"].startswith("container: policy: mrenclave:")


def test_unknown_platform_key_is_refused_unless_trusted_on_first_use(node: Node, relay: RelayProcess,
                                                                     tmp_path: Path) -> None:
    code, verdict, _ = verify(node, relay.address, "--reference", str(node.reference))
    assert code == 1 and verdict["layer"] == "collateral"
    pins = tmp_path / "pins"
    code, verdict, _ = verify(node, relay.address, "--reference", str(node.reference), "--collateral", str(pins),
                              "--trust-on-first-use")
    assert code == 0 and any("trusted on first use" in w for w in verdict["warnings"])
    assert (pins / "wasm_platform_key.pem").read_bytes() == (node.collateral / "wasm_platform_key.pem").read_bytes()
    code, verdict, _ = verify(node, relay.address, "--reference", str(node.reference), "--collateral", str(pins),
                              "--trust-on-first-use")
    assert code == 0 and not any("trusted on first use" in w for w in verdict["warnings"])  # pinned now


def test_relay_evidence_failing_its_own_appraisal_is_refused(node: Node, relay: RelayProcess,
                                                             tmp_path: Path) -> None:
    relay_policy = tmp_path / "relay-policy.json"
    relay_policy.write_text(json.dumps({"reference_values": {"measurement": ["11" * 32]}}))
    code, verdict, _ = verify(node, relay.address, *pinned(node), "--relay-policy", str(relay_policy))
    assert code == 1 and verdict["layer"] == "policy"
    assert verdict["reason"].startswith("relay: policy: measurement:")
    assert verdict["relay"]["verdict"] == "rejected"


# ---------------------------------------------------------------- a compromised relay


@pytest.mark.parametrize("mode, layer, reason", [
    ("stale-nonce", "freshness", "container: freshness: report_data does not start with the expected nonce"),
    ("other-binding", "key binding", "container: key binding: report data binds another container or relay"),
    ("other-container", "policy", "container: policy: mrenclave:"),
    ("forge", "evidence signature", "container: evidence signature: wasm report is signed by another platform"),
])
def test_compromised_relay_cannot_forge_a_pass(node: Node, mode: str, layer: str, reason: str) -> None:
    evil = evil_relay(node, mode)
    try:
        code, verdict, _ = verify(node, evil.address, *pinned(node))
    finally:
        evil.stop()
    assert code == 1, verdict
    assert verdict["layer"] == layer and verdict["reason"].startswith(reason)


def test_replayed_evidence_is_refused(node: Node) -> None:
    evil = evil_relay(node, "replay")
    try:
        first = verify(node, evil.address, *pinned(node))
        second = verify(node, evil.address, *pinned(node))
    finally:
        evil.stop()
    assert first[0] == 0  # the first answer is genuine
    code, verdict, _ = second
    assert code == 1 and verdict["layer"] == "freshness"


def test_trust_on_first_use_trusts_whatever_the_relay_serves(node: Node, tmp_path: Path) -> None:
    """The documented limit of --trust-on-first-use: on first contact a compromised relay serving its own
    platform key passes. Once the genuine key is pinned, the same forgery fails."""
    evil = evil_relay(node, "forge")
    try:
        code, verdict, _ = verify(node, evil.address, "--reference", str(node.reference), "--trust-on-first-use")
        assert code == 0 and any("trusted on first use" in w for w in verdict["warnings"])
        code, verdict, _ = verify(node, evil.address, *pinned(node), "--trust-on-first-use")
        assert code == 1 and verdict["layer"] == "evidence signature"
    finally:
        evil.stop()


# ---------------------------------------------------------------- the relay's identity from a (software) TPM


swtpm = swtpm_fixture()


def test_relay_attested_by_a_tpm(node: Node, swtpm: str, tmp_path: Path) -> None:
    env = {**node.env, "CLAVE_TPM_TCTI": swtpm, "CLAVE_TPM_STATE": str(tmp_path / "tpm")}
    tpm_relay = RelayProcess(["-m", "clave.relay.main", "--root", str(node.root), "--attester", "tpm"], env)
    try:
        code, verdict, _ = verify(node, tpm_relay.address, *pinned(node))
        assert code == 0, verdict
        assert verdict["relay"]["tee"] == "tpm"
        pcr7 = verdict["relay"]["claims"]["pcrs"]["7"]
        good, bad = tmp_path / "good.json", tmp_path / "bad.json"
        good.write_text(json.dumps({"reference_values": {"pcrs.7": [pcr7]}}))
        bad.write_text(json.dumps({"reference_values": {"pcrs.7": ["ab" * 32]}}))
        assert verify(node, tpm_relay.address, *pinned(node), "--relay-policy", str(good))[0] == 0
        code, verdict, _ = verify(node, tpm_relay.address, *pinned(node), "--relay-policy", str(bad))
        assert code == 1 and verdict["reason"].startswith("relay: policy: pcrs.7:")
    finally:
        tpm_relay.stop()
