"""clave-kbs: the key broker and its admin client.

    clave-kbs serve --listen HOST:PORT --cert CERT --key KEY --state DIR [--admin-pubkey PEM] [--policy FILE]
                    [--collateral DIR] [--roots DIR] [--allow-insecure] [--session-ttl SECONDS]
    clave-kbs keygen PRIVATE.pem PUBLIC.pem
    clave-kbs tls-cert CERT.pem KEY.pem [--host NAME_OR_IP]...   (a self-signed certificate for development)
    clave-kbs put-resource    [--url URL] [--ca-file PEM] --admin-key KEY repo/type/tag FILE
    clave-kbs delete-resource [--url URL] [--ca-file PEM] --admin-key KEY repo/type/tag
    clave-kbs set-policy      [--url URL] [--ca-file PEM] --admin-key KEY FILE
    clave-kbs get-policy      [--url URL] [--ca-file PEM] --admin-key KEY

Exit status: 0 done, 1 refused or failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import base64
import os
import ssl
import sys
from pathlib import Path

from clave.attestation.cli import UsageError, check_directories, read_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_URL = "https://127.0.0.1:8080"


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clave-kbs", description="Key broker (Confidential Containers KBS protocol)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the key broker over HTTPS")
    serve.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT")
    serve.add_argument("--cert", required=True, help="TLS certificate chain (PEM)")
    serve.add_argument("--key", required=True, help="TLS private key (PEM)")
    serve.add_argument("--state", required=True, metavar="DIR", help="secrets, policy, token key, audit log")
    serve.add_argument("--admin-pubkey", metavar="PEM", help="Ed25519 public key of the admin (admin API off without)")
    serve.add_argument("--policy", metavar="FILE", help="resource policy JSON (replaces the stored one)")
    serve.add_argument("--collateral", metavar="DIR", help="verification collateral files named by role")
    serve.add_argument("--roots", metavar="DIR", help="trust anchors overriding the packaged vendor roots")
    serve.add_argument("--allow-insecure", action="store_true",
                       help="accept software-only evidence (sample, wasm, tpm): development only")
    serve.add_argument("--session-ttl", type=float, default=300.0, metavar="SECONDS",
                       help="lifetime of a session and of its attestation token (default 300)")

    keygen = verbs.add_parser("keygen", help="make an Ed25519 admin key pair")
    keygen.add_argument("private", metavar="PRIVATE.pem")
    keygen.add_argument("public", metavar="PUBLIC.pem")

    tls = verbs.add_parser("tls-cert", help="make a self-signed TLS certificate and key (development)")
    tls.add_argument("cert", metavar="CERT.pem")
    tls.add_argument("key", metavar="KEY.pem")
    tls.add_argument("--host", action="append", metavar="NAME_OR_IP",
                     help="a name or address the certificate is for (repeatable; default 127.0.0.1 and localhost)")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default=DEFAULT_URL, help=f"KBS base URL (default {DEFAULT_URL})")
    remote.add_argument("--ca-file", metavar="PEM", help="CA certificate(s) to trust for the KBS")
    remote.add_argument("--admin-key", required=True, metavar="PEM", help="the admin's Ed25519 private key")
    put = verbs.add_parser("put-resource", parents=[remote], help="store a secret")
    put.add_argument("resource", metavar="repo/type/tag")
    put.add_argument("file", metavar="FILE")
    delete = verbs.add_parser("delete-resource", parents=[remote], help="delete a secret")
    delete.add_argument("resource", metavar="repo/type/tag")
    set_policy = verbs.add_parser("set-policy", parents=[remote], help="replace the resource policy")
    set_policy.add_argument("file", metavar="FILE")
    verbs.add_parser("get-policy", parents=[remote], help="print the resource policy")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from clave.attestation.policy import PolicyError
    from clave.kbs.admin import AdminAuthError
    from clave.kbs.server import Config, serve
    from clave.kbs.store import StoreError

    check_directories(args)
    for option in ("cert", "key"):
        if not Path(getattr(args, option)).is_file():
            raise UsageError(f"--{option} {getattr(args, option)}: no such file")
    try:  # uvicorn would fail on these with a traceback
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.cert, args.key)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--cert {args.cert} / --key {args.key}: not a usable TLS certificate and key "
                         f"({exc})") from None
    if args.session_ttl <= 0:
        raise UsageError("--session-ttl must be positive")
    config = Config(
        state=Path(args.state),
        admin_pubkey=read_file(args.admin_pubkey) if args.admin_pubkey else None,
        collateral=Path(args.collateral) if args.collateral else None,
        roots=Path(args.roots) if args.roots else None,
        policy=read_file(args.policy) if args.policy else None,
        allow_insecure=args.allow_insecure,
        session_ttl=args.session_ttl,
    )
    host, port = args.listen
    if args.allow_insecure:
        print("clave-kbs: WARNING: --allow-insecure: software-only evidence is accepted (development only)",
              file=sys.stderr)
    try:
        serve(config, host, port, args.cert, args.key)
    except (PolicyError, AdminAuthError, StoreError) as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    from clave.kbs.admin import keygen

    private, public = keygen()
    try:
        fd = os.open(args.private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.private} exists; not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    Path(args.public).write_bytes(public)
    print(f"admin private key: {args.private}\nadmin public key:  {args.public} (give it to clave-kbs serve "
          "--admin-pubkey)")
    return EXIT_OK


def _tls_cert(args: argparse.Namespace) -> int:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    hosts = args.host or ["127.0.0.1", "localhost"]
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"clave-kbs {hosts[0]}")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    try:
        fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.key} exists; not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    Path(args.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    print(f"TLS certificate: {args.cert} (for {', '.join(hosts)}; clients trust it with --ca-file)")
    print(f"TLS key: {args.key}")
    return EXIT_OK


def _admin(args: argparse.Namespace) -> int:
    from clave.kbs import protocol
    from clave.kbs.admin import AdminAuthError, make_admin_token
    from clave.kbs.client import Connection, parse_resource

    try:
        token = make_admin_token(read_file(args.admin_key))
    except AdminAuthError as exc:
        raise UsageError(f"--admin-key {args.admin_key}: {exc}") from None
    headers = {"Authorization": f"Bearer {token}"}
    conn = Connection(args.url, args.ca_file, 10.0)
    try:
        if args.verb in ("put-resource", "delete-resource"):
            path = "/".join(parse_resource(args.resource))
            url = f"{protocol.PREFIX}/resource/{path}"
            if args.verb == "put-resource":
                conn.request("POST", url, read_file(args.file), headers)
                print(f"stored {path}")
            else:
                conn.request("DELETE", url, None, headers)
                print(f"deleted {path}")
        elif args.verb == "set-policy":
            from clave.kbs.policy import ResourcePolicy

            text = read_file(args.file)
            ResourcePolicy.from_json(text)  # refuse a broken policy before sending it
            encoded = base64.urlsafe_b64encode(text).decode().rstrip("=")
            conn.request("POST", f"{protocol.PREFIX}/resource-policy", {"policy": encoded}, headers)
            print("resource policy set")
        else:
            _, answer = conn.request("GET", f"{protocol.PREFIX}/resource-policy", None, headers)
            encoded = answer.get("policy", "") if isinstance(answer, dict) else ""
            sys.stdout.write(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode() + "\n")
    finally:
        conn.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from clave.attestation.policy import PolicyError
    from clave.kbs.client import KbsError

    try:
        if args.verb == "serve":
            return _serve(args)
        if args.verb == "keygen":
            return _keygen(args)
        if args.verb == "tls-cert":
            return _tls_cert(args)
        return _admin(args)
    except (UsageError, PolicyError) as exc:
        print(f"clave-kbs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KbsError as exc:
        print(f"clave-kbs: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
