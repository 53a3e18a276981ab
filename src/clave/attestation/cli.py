"""clave-verify: verify TEE evidence or an RA-TLS certificate offline and print a verdict.

    clave-verify evidence FILE [--tee TEE|auto] [--collateral DIR] [--at TIME] [--policy FILE]
                              [--roots DIR] [--nonce HEX] [--json]
    clave-verify cert FILE.pem [same options but --tee]
    clave-verify remote HOST:PORT --container ID [--policy FILE] [--reference MEASURE.json]
                              [--relay-policy FILE] [--collateral DIR] [--trust-on-first-use] [--json] ...

remote asks a clave-relay, over attested TLS, for the named container's evidence bound to a fresh nonce and
appraises both: the relay's own evidence against --relay-policy, the container's against --policy plus the
reference values of --reference (the output of `clave enclave measure`). See docs/relay.md.

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
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--collateral", metavar="DIR", help="collateral files named by role")
    base.add_argument("--at", metavar="TIME", type=_parse_time, help="verification time, ISO-8601")
    base.add_argument("--policy", metavar="FILE", help="appraisal policy JSON (default policy otherwise)")
    base.add_argument("--roots", metavar="DIR", help="trust anchors overriding the packaged vendor roots")
    base.add_argument("--json", action="store_true", help="print the verdict as JSON")
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("--nonce", metavar="HEX", type=_parse_hex, help="nonce the evidence must carry")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{evidence,cert,remote}")
    evidence = verbs.add_parser("evidence", parents=[common], help="verify an evidence file")
    evidence.add_argument("file", metavar="FILE")
    evidence.add_argument("--tee", choices=TEES, default="auto", help="evidence type (default: recognise it)")
    cert = verbs.add_parser("cert", parents=[common], help="verify an RA-TLS certificate (PEM or DER)")
    cert.add_argument("file", metavar="FILE.pem")
    remote = verbs.add_parser("remote", parents=[base], help="appraise a container through a clave-relay")
    remote.add_argument("address", metavar="HOST:PORT", help="the relay (HOST:PORT or a unix socket path)")
    remote.add_argument("--container", metavar="ID", required=True, help="the container to appraise")
    remote.add_argument("--reference", metavar="FILE", action="append", default=[],
                        help="reference values from `clave enclave measure` (repeatable: each adds accepted values)")
    remote.add_argument("--relay-policy", metavar="FILE", help="policy for the relay's own evidence")
    remote.add_argument("--trust-on-first-use", action="store_true",
                        help="use the wasm platform key the relay serves when --collateral has none, and save "
                             "it there once accepted (INSECURE on first contact)")
    remote.add_argument("--timeout", metavar="SECONDS", type=float, default=30.0, help="network timeout")
    return parser


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def check_directories(args: argparse.Namespace, options: tuple[str, ...] = ("collateral", "roots")) -> None:
    """Each of these options, when given, names an existing directory."""
    for option in options:
        directory = getattr(args, option)
        if directory is not None and not Path(directory).is_dir():
            raise UsageError(f"--{option} {directory}: not a directory")


def _context(args: argparse.Namespace) -> Any:
    from clave.attestation.base import Collateral, Roots, VerifyContext

    check_directories(args)
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


def _load_policy(path: str) -> Any:
    from clave.attestation.policy import Policy, PolicyError

    try:
        return Policy.load(path)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None


def _with_references(policy: Any, paths: list[str]) -> Any:
    """Add the mrenclave/mrsigner printed by `clave enclave measure` to the policy's reference values."""
    import dataclasses

    refs = {name: list(values) for name, values in policy.reference_values.items()}
    for path in paths:
        try:
            measured = json.loads(read_file(path))
        except json.JSONDecodeError as exc:
            raise UsageError(f"--reference {path}: not JSON: {exc}") from None
        if not isinstance(measured, dict) or not isinstance(measured.get("mrenclave"), str):
            raise UsageError(f"--reference {path}: no mrenclave (expected `clave enclave measure` output)")
        for name in ("mrenclave", "mrsigner"):
            if isinstance(measured.get(name), str):
                refs.setdefault(name, []).append(measured[name])
    return dataclasses.replace(policy, reference_values={k: tuple(v) for k, v in refs.items()})


def _verify_remote(args: argparse.Namespace) -> Any:
    from clave.attestation.appraise import Verdict
    from clave.attestation.policy import DEFAULT_POLICY
    from clave.relay import client, protocol

    try:
        address = protocol.parse_address(args.address)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.trust_on_first_use and args.collateral and not os.path.exists(args.collateral):
        os.makedirs(args.collateral, mode=0o700)  # the pin store of trust on first use
    ctx = _context(args)
    policy = _with_references(_policy(args), args.reference)
    relay_policy = _load_policy(args.relay_policy) if args.relay_policy else DEFAULT_POLICY
    pin = Path(args.collateral) if args.trust_on_first_use and args.collateral else None
    try:
        return client.verify_remote(address, args.container, policy=policy, relay_policy=relay_policy, ctx=ctx,
                                    trust_on_first_use=args.trust_on_first_use, pin_directory=pin,
                                    timeout=args.timeout)
    except client.RelayUnavailable as exc:
        return client.RemoteVerdict(Verdict(False, None, reason=f"relay unavailable: {exc}"),
                                    container=args.container)


def _verify_evidence(args: argparse.Namespace) -> Any:
    from clave.attestation.appraise import UnknownTee, appraise

    data = _evidence_bytes(read_file(args.file))
    ctx = _context(args)
    ctx.nonce = args.nonce
    try:
        return appraise(data, tee=args.tee, ctx=ctx, policy=_policy(args))
    except UnknownTee as exc:
        raise UsageError(str(exc)) from None


def _evidence_bytes(data: bytes) -> bytes:
    """The evidence in FILE: raw, or the JSON document `clave attest --format json` prints (its base64
    "evidence")."""
    if not data.lstrip().startswith(b"{"):
        return data
    import base64
    import binascii

    try:
        doc = json.loads(data)
        return base64.b64decode(doc["evidence"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        return data  # not that document: the verifiers judge it as it is


def _verify_cert(args: argparse.Namespace) -> Any:
    from clave.attestation import ratls
    from clave.attestation.appraise import Verdict
    from clave.attestation.base import VerificationError

    data = read_file(args.file)
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


def _print_remote(remote: Any) -> None:
    relay = remote.relay
    if remote.accepted:
        print(f"accepted: container {remote.container}: {remote.verdict.tee} evidence, through a relay "
              f"attested by {relay.tee} evidence")
        for name, value in remote.verdict.claims.items():
            print(f"  {name}: {json.dumps(value, default=_json_default)}")
    else:
        print(f"rejected: {remote.verdict.reason}")
    if remote.pinned_platform_key is not None:
        print(f"note: wasm platform key pinned in {remote.pinned_platform_key}")
    for warning in remote.verdict.warnings:
        print(f"warning: {warning}")


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
        verify = {"evidence": _verify_evidence, "cert": _verify_cert, "remote": _verify_remote}[args.verb]
        verdict = verify(args)
    except UsageError as exc:
        print(f"clave-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if verdict.insecure:
        print(INSECURE_NOTICE, file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(verdict.as_json(), indent=2, default=_json_default), flush=True)
        else:
            (_print_remote if args.verb == "remote" else _print_human)(verdict)
            sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the verdict still decides the exit status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_ACCEPTED if verdict.accepted else EXIT_REJECTED


if __name__ == "__main__":
    sys.exit(main())
