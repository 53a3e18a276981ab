"""Helpers for clave-kbs tests and bench: real broker processes on loopback, a self-signed certificate made here.

A module of its own (not conftest) so tests and bench/bench_kbs.py can import it by a unique name."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from clave.attestation.attesters.sample import DEFAULT_MEASUREMENT
from clave.kbs.admin import keygen

REPO = Path(__file__).resolve().parents[2]
MRENCLAVE = bytes(range(32))
MRSIGNER = bytes(range(32, 64))


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clave-kbs test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Material:
    directory: Path
    cert: Path
    key: Path
    admin_private: Path
    admin_public: Path
    other_admin_private: Path
    wasm_key: Ed25519PrivateKey
    collateral: Path
    policy: Path


@dataclass
class Kbs:
    url: str
    ca_file: str
    state: Path
    process: subprocess.Popen[bytes]
    material: Material

    def audit(self) -> list[dict[str, object]]:
        path = self.state / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def default_policy() -> dict[str, object]:
    return {
        "default/key/*": [
            {"tee": ["sample"], "reference_values": {"measurement": [DEFAULT_MEASUREMENT.hex()]}},
            {"tee": ["wasm"], "reference_values": {"mrenclave": [MRENCLAVE.hex()], "mrsigner": [MRSIGNER.hex()]}},
        ],
    }


def make_material(directory: Path) -> Material:
    cert, key = make_tls_cert(directory)
    private, public = keygen()
    (directory / "admin.key").write_bytes(private)
    (directory / "admin.pub").write_bytes(public)
    other, _ = keygen()
    (directory / "other-admin.key").write_bytes(other)
    wasm_key = Ed25519PrivateKey.generate()
    collateral = directory / "collateral"
    collateral.mkdir()
    (collateral / "wasm_platform_key.pem").write_bytes(wasm_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    policy = directory / "policy.json"
    policy.write_text(json.dumps(default_policy()))
    return Material(directory, cert, key, directory / "admin.key", directory / "admin.pub",
                    directory / "other-admin.key", wasm_key, collateral, policy)


def _wait_ready(process: subprocess.Popen[bytes], port: int, ca_file: Path, stderr: Path, deadline: float) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"clave-kbs exited with {process.returncode}: {stderr.read_text().strip()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("clave-kbs did not start listening in time")


def start_kbs(material: Material, state: Path, *extra: str, admin: bool = True) -> Kbs:
    """``clave-kbs serve`` as a process on a free loopback port, returned once it answers TLS handshakes."""
    port = free_port()
    argv = [
        sys.executable, "-m", "clave.kbs.cli", "serve", "--listen", f"127.0.0.1:{port}",
        "--cert", str(material.cert), "--key", str(material.key), "--state", str(state),
        "--collateral", str(material.collateral), "--policy", str(material.policy), *extra,
    ]
    if admin:
        argv += ["--admin-pubkey", str(material.admin_public)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    stderr = state.with_name(state.name + ".stderr")  # a file, not a pipe: a chatty server never blocks on it
    with stderr.open("wb") as err:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        _wait_ready(process, port, material.cert, stderr, time.monotonic() + 20)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Kbs(f"https://127.0.0.1:{port}", str(material.cert), state, process, material)


def stop_kbs(kbs: Kbs) -> None:
    if kbs.process.poll() is None:
        os.kill(kbs.process.pid, signal.SIGTERM)
        try:
            kbs.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(kbs.process.pid, signal.SIGKILL)
            kbs.process.wait()
