"""Attested TLS between processes on loopback: a server process (_tls_peer.py) and a client here."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from clave.attestation import tls
from clave.attestation.attesters.sample import DEFAULT_MEASUREMENT, SampleAttester
from clave.attestation.base import Layer, VerificationError
from clave.attestation.policy import Policy

PEER = Path(__file__).with_name("_tls_peer.py")
OTHER_MEASUREMENT = bytes(range(32))
PIN_DEFAULT = Policy(reference_values={"measurement": (DEFAULT_MEASUREMENT.hex(),)})


class Peer:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.address = ("127.0.0.1", port)

    def outcome(self) -> dict[str, object]:
        """The next connection's server-side outcome."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"server process exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return json.loads(line)  # type: ignore[no-any-return]


@contextmanager
def peer(*args: str) -> Iterator[Peer]:
    proc = subprocess.Popen(
        [sys.executable, str(PEER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first.startswith("PORT "):
            pytest.fail(f"server did not start: {first!r} {proc.stderr.read() if proc.stderr else ''}")
        yield Peer(proc, int(first.split()[1]))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _echo(sock: ssl.SSLSocket, text: bytes = b"hello attested world\n") -> bytes:
    sock.sendall(text)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_one_way_attestation_accepted_and_data_flows() -> None:
    with peer("serve", "--count", "2") as server:
        for _ in range(2):  # two connections: each gets its own nonce and certificate
            sock, attested = tls.connect(server.address, PIN_DEFAULT, timeout=10)
            with sock:
                assert attested.tee == "sample" and attested.insecure
                assert attested.claims["measurement"] == DEFAULT_MEASUREMENT.hex()
                assert attested.nonce is not None and len(attested.nonce) == tls.NONCE_SIZE
                assert sock.version() in ("TLSv1.2", "TLSv1.3")
                assert _echo(sock) == b"HELLO ATTESTED WORLD\n"
            assert server.outcome() == {"accepted": True, "client": None}


def test_nonces_differ_per_connection() -> None:
    with peer("serve", "--count", "2") as server:
        nonces = []
        for _ in range(2):
            sock, attested = tls.connect(server.address, timeout=10)
            with sock:
                nonces.append(attested.nonce)
                _echo(sock)
        assert nonces[0] != nonces[1]


def test_wrong_measurement_is_rejected_by_policy() -> None:
    with peer("serve", "--measurement", OTHER_MEASUREMENT.hex()) as server:
        with pytest.raises(VerificationError) as excinfo:
            tls.connect(server.address, PIN_DEFAULT, timeout=10)
    assert excinfo.value.layer is Layer.POLICY
    assert "measurement" in str(excinfo.value)


def test_replayed_certificate_is_rejected_for_freshness() -> None:
    with peer("replay") as server:
        with pytest.raises(VerificationError) as excinfo:
            tls.connect(server.address, PIN_DEFAULT, timeout=10)
    assert excinfo.value.layer is Layer.FRESHNESS


def test_certificate_key_not_bound_by_evidence_is_rejected() -> None:
    with peer("wrongkey") as server:
        with pytest.raises(VerificationError) as excinfo:
            tls.connect(server.address, PIN_DEFAULT, timeout=10)
    assert excinfo.value.layer is Layer.KEY_BINDING


def test_mutual_attestation_accepted_both_ways() -> None:
    with peer("serve", "--mutual") as server:
        sock, attested = tls.connect(server.address, PIN_DEFAULT, attester=SampleAttester(), timeout=10)
        with sock:
            assert attested.claims["measurement"] == DEFAULT_MEASUREMENT.hex()
            assert _echo(sock) == b"HELLO ATTESTED WORLD\n"
        outcome = server.outcome()
    assert outcome["accepted"] is True
    client = outcome["client"]
    assert isinstance(client, dict) and client["measurement"] == DEFAULT_MEASUREMENT.hex()


def test_mutual_client_with_wrong_measurement_is_refused_by_server() -> None:
    with peer("serve", "--mutual") as server:
        wrong = SampleAttester(measurement=OTHER_MEASUREMENT)
        with pytest.raises(OSError):
            sock, _ = tls.connect(server.address, PIN_DEFAULT, attester=wrong, timeout=10)
            _echo(sock)  # on TLS 1.3 the refusal may only surface at the first read
        outcome = server.outcome()
    assert outcome["accepted"] is False and outcome["layer"] == Layer.POLICY.value
    assert "measurement" in str(outcome["reason"])


def test_mutual_server_refuses_client_without_attester() -> None:
    with peer("serve", "--mutual") as server:
        with pytest.raises(tls.AttestedTLSError, match="requires client attestation"):
            tls.connect(server.address, timeout=10)
        assert server.outcome()["accepted"] is False


def test_plain_tls_client_is_refused_by_attested_server() -> None:
    with peer("serve") as server:
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        plain.check_hostname, plain.verify_mode = False, ssl.CERT_NONE
        raw = socket.create_connection(server.address, timeout=10)
        with pytest.raises(OSError):
            with plain.wrap_socket(raw) as sock:
                _echo(sock)
        outcome = server.outcome()
    assert outcome["accepted"] is False and "magic" in str(outcome["reason"])
