"""clave-relay: serve the evidence of this node's enclave containers to remote verifiers over attested TLS.

    clave-relay [--listen HOST:PORT|/PATH.sock] [--root DIR]... [--attester NAME] [--log-level LEVEL]

The relay's own TLS identity is an RA-TLS certificate from this node's best attester (or ``--attester``),
fresh for every connection and bound to the verifier's nonce. Each ``--root`` is a Clave state root (glob
patterns allowed) searched for the requested container; default: /run/clave and /run/containerd/clave/*.
Prints one line, ``clave-relay: listening on ADDRESS ...``, once it accepts connections; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from clave.relay import protocol

DEFAULT_LISTEN = f"127.0.0.1:{protocol.DEFAULT_PORT}"


def _address(text: str) -> tuple[str, int] | str:
    try:
        return protocol.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clave-relay",
        description="Relay the evidence of this node's enclave containers to remote verifiers (attested TLS).")
    parser.add_argument("--listen", metavar="HOST:PORT", type=_address, default=_address(DEFAULT_LISTEN),
                        help=f"address to serve on (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    parser.add_argument("--root", metavar="DIR", action="append",
                        help="Clave state root to find containers in (repeatable; default: /run/clave and "
                             "/run/containerd/clave/*)")
    parser.add_argument("--attester", metavar="NAME", help="attester for the relay's own TLS identity "
                        "(default: the best one on this host)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return parser


def _listener(address: tuple[str, int] | str) -> tuple[socket.socket, str]:
    from clave.relay.server import listen

    if isinstance(address, str):
        if os.path.exists(address):
            os.unlink(address)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
        sock.listen(64)
        return sock, address
    sock = listen(*address)
    host, port = sock.getsockname()[:2]
    return sock, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _attester(name: str | None) -> Any:
    from clave.attestation import registry
    from clave.attestation.base import AttesterUnavailable

    try:
        attester = registry.attester(name)
        evidence = attester.attest(bytes(protocol.REPORT_DATA_SIZE))  # fail now, not on the first verifier
    except (AttesterUnavailable, KeyError) as exc:
        raise SystemExit(f"clave-relay: attester: {exc}") from None
    except Exception as exc:  # the device is there but failed: still one line
        raise SystemExit(f"clave-relay: attester {name or 'default'} failed: {exc}") from None
    return attester, evidence.insecure


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="clave-relay: %(message)s")
    from clave.relay.server import DEFAULT_ROOTS, EngineEvidence, Relay

    attester, insecure = _attester(args.attester)
    return serve(Relay(EngineEvidence(args.root or DEFAULT_ROOTS), attester), args.listen, insecure)


def serve(relay: Any, address: tuple[str, int] | str, insecure: bool = False) -> int:
    """Listen on ``address`` and serve ``relay`` until SIGTERM or SIGINT."""
    try:
        listener, shown = _listener(address)
    except OSError as exc:
        print(f"clave-relay: cannot listen on {address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    note = ", INSECURE: its evidence proves nothing about a TEE" if insecure else ""
    print(f"clave-relay: listening on {shown} (attester {relay.tls.attester.name}{note})", flush=True)
    try:
        relay.serve_forever(listener, stop)
    finally:
        listener.close()
        if isinstance(address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
