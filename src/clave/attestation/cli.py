"""clave-verify: verify TEE evidence or an RA-TLS certificate offline and print a verdict.

    clave-verify evidence FILE [--tee TEE|auto] [--collateral DIR] [--at TIME] [--policy FILE]
                              [--roots DIR] [--nonce HEX] [--json]
    clave-verify cert FILE.pem [same options but --tee]

Exit status: 0 accepted, 1 rejected, 2 usage error. Heavy imports (cryptography) happen only when needed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

TEES = ("auto", "sgx", "tdx", "snp", "nitro", "tpm", "wasm", "sample")
EXIT_ACCEPTED, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2
INSECURE_NOTICE = "WARNING: INSECURE evidence (no TEE behind it, development only): it proves nothing"


class UsageError(Exception):
    pass


def _parse_time(text: str) -> _dt.datetime:
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)


def _parse_hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clave-verify", description="Verify TEE evidence or an attested TLS certificate offline."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--collateral", metavar="DIR", help="collateral files named by role")
    common.add_argument("--at", metavar="TIME", type=_parse_time, help="verification time, ISO-8601")
    common.add_argument("--policy", metavar="FILE", help="appraisal policy JSON (default policy otherwise)")
    common.add_argument("--roots", metavar="DIR", help="trust anchors overriding the packaged vendor roots")
    common.add_argument("--nonce", metavar="HEX", type=_parse_hex, help="nonce the evidence must carry")
    common.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{evidence,cert}")
    evidence = verbs.add_parser("evidence", parents=[common], help="verify an evidence file")
    evidence.add_argument("file", metavar="FILE")
    evidence.add_argument("--tee", choices=TEES, default="auto", help="evidence type (default: recognise it)")
    cert = verbs.add_parser("cert", parents=[common], help="verify an RA-TLS certificate (PEM or DER)")
    cert.add_argument("file", metavar="FILE.pem")
    return parser


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _context(args: argparse.Namespace) -> Any:
    from clave.attestation.base import Collateral, Roots, VerifyContext

    for option in ("collateral", "roots"):
        directory = getattr(args, option)
        if directory is not None and not Path(directory).is_dir():
            raise UsageError(f"--{option} {directory}: not a directory")
    ctx = VerifyContext(collateral=Collateral(args.collateral), roots=Roots(args.roots))
    if args.at is not None:
        ctx.now = args.at
    return ctx


def _policy(args: argparse.Namespace) -> Any:
    from clave.attestation.policy import DEFAULT_POLICY, Policy, PolicyError

    if args.policy is None:
        return DEFAULT_POLICY
    try:
        return Policy.load(args.policy)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None


def _verify_evidence(args: argparse.Namespace) -> Any:
    from clave.attestation.appraise import UnknownTee, appraise

    data = _read(args.file)
    ctx = _context(args)
    ctx.nonce = args.nonce
    try:
        return appraise(data, tee=args.tee, ctx=ctx, policy=_policy(args))
    except UnknownTee as exc:
        raise UsageError(str(exc)) from None


def _verify_cert(args: argparse.Namespace) -> Any:
    from clave.attestation import ratls
    from clave.attestation.appraise import Verdict
    from clave.attestation.base import VerificationError

    data = _read(args.file)
    ctx, policy = _context(args), _policy(args)
    try:
        peer = ratls.verify_certificate(data, policy=policy, nonce=args.nonce, ctx=ctx)
    except VerificationError as exc:
        tee = ratls.peek_tee(data)
        return Verdict(False, tee, reason=str(exc), layer=exc.layer)
    claims = dict(peer.claims)
    if peer.nonce is not None:
        claims["ratls_nonce"] = peer.nonce.hex()
    return Verdict(True, peer.tee, claims, None, None, peer.insecure, peer.warnings)


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


def _print_human(verdict: Any) -> None:
    if verdict.accepted:
        print(f"accepted: {verdict.tee} evidence")
        for name, value in verdict.claims.items():
            print(f"  {name}: {json.dumps(value, default=_json_default)}")
    else:
        print(f"rejected: {verdict.reason}")
    for warning in verdict.warnings:
        print(f"warning: {warning}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        verdict = _verify_evidence(args) if args.verb == "evidence" else _verify_cert(args)
    except UsageError as exc:
        print(f"clave-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if verdict.insecure:
        print(INSECURE_NOTICE, file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(verdict.as_json(), indent=2, default=_json_default), flush=True)
        else:
            _print_human(verdict)
            sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the verdict still decides the exit status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_ACCEPTED if verdict.accepted else EXIT_REJECTED


if __name__ == "__main__":
    sys.exit(main())
