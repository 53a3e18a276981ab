"""Attested-TLS handshake vs plain TLS handshake on loopback, interleaved.

    python bench/bench_attested_tls.py [-n RUNS] [--mutual]

A server process listens on two ports: plain TLS with a fixed self-signed ECDSA P-256 certificate, and
Clave attested TLS (sample attester: a fresh RA-TLS certificate per connection, bound to the client's
nonce). The client here alternates one plain and one attested connection, N times, and times each from
TCP connect to a verified TLS session (plain: the pinned certificate is checked by OpenSSL; attested:
nonce exchange, handshake, evidence + key binding + nonce + policy). Prints medians and their ratio.

The sample attester costs almost nothing, so the ratio shows the protocol's own overhead; a hardware
attester adds its quote generation time (SGX/TDX: milliseconds) on the server side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import statistics
import threading
import time
from multiprocessing.connection import Connection


def _serve(pipe: Connection, mutual: bool) -> None:
    from clave.attestation import ratls, tls
    from clave.attestation.attesters.sample import SampleAttester

    plain_identity = ratls.create_certificate(SampleAttester())  # any certificate will do for plain TLS
    plain_context = tls.server_context(plain_identity)
    server = tls.AttestedServer(SampleAttester(), require_client_attestation=mutual)
    plain_listener = socket.create_server(("127.0.0.1", 0))
    attested_listener = socket.create_server(("127.0.0.1", 0))

    def plain_loop() -> None:
        while True:
            sock, _ = plain_listener.accept()
            try:
                with plain_context.wrap_socket(sock, server_side=True) as conn:
                    conn.recv(1)  # wait for the client to hang up
            except OSError:
                pass

    def attested_loop() -> None:
        while True:
            sock, _ = attested_listener.accept()
            try:
                conn = server.wrap_socket(sock)
                with conn.socket:
                    conn.socket.recv(1)
            except OSError:
                pass

    for loop in (plain_loop, attested_loop):
        threading.Thread(target=loop, daemon=True).start()
    pipe.send((plain_listener.getsockname()[1], attested_listener.getsockname()[1], plain_identity.der))
    pipe.recv()  # until the client is done


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--runs", type=int, default=200, help="connections of each kind (default 200)")
    parser.add_argument("--mutual", action="store_true", help="attested side uses mutual attestation")
    args = parser.parse_args()

    from clave.attestation import tls
    from clave.attestation.attesters.sample import SampleAttester

    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(theirs, args.mutual), daemon=True)
    server.start()
    plain_port, attested_port, plain_der = ours.recv()

    plain_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain_context.check_hostname = False
    plain_context.load_verify_locations(cadata=plain_der)  # pinned: OpenSSL verifies it
    client_attester = SampleAttester() if args.mutual else None

    def plain_handshake() -> float:
        start = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", plain_port))
        conn = plain_context.wrap_socket(sock)
        elapsed = time.perf_counter() - start
        conn.close()
        return elapsed

    def attested_handshake() -> float:
        start = time.perf_counter()
        conn, peer = tls.connect(("127.0.0.1", attested_port), attester=client_attester)
        elapsed = time.perf_counter() - start
        assert peer.tee == "sample"
        conn.close()
        return elapsed

    for _ in range(10):  # warm-up: imports, first-use costs
        plain_handshake()
        attested_handshake()
    plain: list[float] = []
    attested: list[float] = []
    for _ in range(args.runs):
        plain.append(plain_handshake())
        attested.append(attested_handshake())
    ours.send("done")
    server.join(timeout=5)

    print(f"loopback handshakes, {args.runs} runs each, interleaved{' (mutual)' if args.mutual else ''}")
    for name, values in (("plain TLS", plain), ("attested TLS", attested)):
        print(
            f"  {name:13s} median {statistics.median(values) * 1e3:7.3f} ms"
            f"   p10 {_percentile(values, 0.1) * 1e3:7.3f} ms   p90 {_percentile(values, 0.9) * 1e3:7.3f} ms"
        )
    print(f"  ratio attested/plain (medians): {statistics.median(attested) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
