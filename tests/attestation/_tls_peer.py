"""An attested-TLS server process for test_tls.py and the benchmark (run as a script, not collected).

    _tls_peer.py MODE [--mutual] [--measurement HEX] [--client-measurement HEX] [--count N]

MODE: ``serve`` (honest server), ``replay`` (presents a certificate issued earlier for another nonce),
``wrongkey`` (presents genuine evidence re-signed under a key the evidence does not bind). Prints
``PORT <n>`` once listening, then one JSON line per connection with the server-side outcome; each accepted
connection echoes one line back in upper case.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from cryptography import x509

from clave.attestation import ratls, tls
from clave.attestation.attesters.sample import DEFAULT_MEASUREMENT, SampleAttester
from clave.attestation.base import VerificationError
from clave.attestation.policy import Policy


def _echo(conn: socket.socket) -> None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    conn.sendall(data.upper())


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def serve(listener: socket.socket, args: argparse.Namespace, attester: SampleAttester) -> None:
    client_policy = Policy(reference_values={"measurement": (args.client_measurement,)})
    server = tls.AttestedServer(
        attester, require_client_attestation=args.mutual, client_policy=client_policy, handshake_timeout=10
    )
    for _ in range(args.count):
        sock, _address = listener.accept()
        try:
            conn = server.wrap_socket(sock)
        except VerificationError as exc:
            _report(accepted=False, layer=exc.layer.value, reason=str(exc))
            continue
        except OSError as exc:
            _report(accepted=False, layer=None, reason=str(exc))
            continue
        _report(accepted=True, client=conn.peer.claims if conn.peer else None)
        with conn.socket:
            _echo(conn.socket)


def misbehave(listener: socket.socket, args: argparse.Namespace, attester: SampleAttester) -> None:
    stale = ratls.create_certificate(attester, nonce=os.urandom(tls.NONCE_SIZE))  # recorded earlier
    for _ in range(args.count):
        sock, _address = listener.accept()
        _flags, client_nonce = tls.read_hello(sock)
        tls.send_hello(sock, 0, bytes(tls.NONCE_SIZE))
        if args.mode == "replay":
            identity = stale
        else:  # wrongkey: fresh evidence for this nonce, but presented under another key
            genuine = ratls.create_certificate(attester, nonce=client_nonce)
            oid = x509.ObjectIdentifier(ratls.TCG_DICE_TAGGED_EVIDENCE_OID)
            evidence_ext = genuine.certificate.extensions.get_extension_for_oid(oid).value
            assert isinstance(evidence_ext, x509.UnrecognizedExtension)
            other_key = ratls.generate_key()
            cert = ratls.build_certificate(other_key, {oid.dotted_string: evidence_ext.value})
            identity = ratls.AttestedCertificate(cert, other_key, genuine.evidence, genuine.claims)
        try:
            with tls.server_context(identity).wrap_socket(sock, server_side=True) as conn:
                _report(accepted=True, mode=args.mode)
                _echo(conn)
        except OSError as exc:  # the client hangs up once it has judged the certificate
            _report(accepted=True, mode=args.mode, closed=str(exc))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("serve", "replay", "wrongkey"))
    parser.add_argument("--mutual", action="store_true")
    parser.add_argument("--measurement", default=DEFAULT_MEASUREMENT.hex())
    parser.add_argument("--client-measurement", default=DEFAULT_MEASUREMENT.hex())
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    attester = SampleAttester(measurement=bytes.fromhex(args.measurement))
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    with listener:
        (serve if args.mode == "serve" else misbehave)(listener, args, attester)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
