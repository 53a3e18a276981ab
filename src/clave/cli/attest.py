"""attest: produce TEE evidence from this host's (or this enclave's) best attester.

usage: clave attest [--attester NAME] [--nonce HEX] [--report-data HEX] [--format json|cert] [--out FILE]
       clave attest ID --nonce HEX [--format json|cert]   evidence of a running enclave container, from its runtime
       clave attest [ID] --kbs URL --resource REPO/TYPE/TAG --out PATH [--kbs-ca CA.pem] [--attester NAME]
--format json prints {"tee", "attester", "insecure", "report_data", "evidence" (base64)}; the report data is the
given --report-data, or SHA-256 of the nonce. --format cert prints an RA-TLS certificate (PEM) binding a fresh
key and the nonce, then its private key (PEM). `clave-verify evidence|cert` checks either.

With --kbs, the evidence goes to a key broker (the KBS protocol) and the secret it releases is written to PATH,
which must be on a tmpfs: with ID, by that enclave container's own runtime, inside the container (it must have
been started with enclave.kbs.url); without, by this host's or this container's attester.
"""

from __future__ import annotations

from clave.cli.main import Parsed, UsageError
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attester": ("str", ("a",)),
    "nonce": ("str", ()),
    "report-data": ("str", ()),
    "format": ("str", ("f",)),
    "out": ("str", ("o",)),
    "kbs": ("str", ()),
    "resource": ("str", ()),
    "kbs-ca": ("str", ()),
    "help": ("bool", ("h",)),
}


def _hex(text: str | None, flag: str, limit: int) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"--{flag} must be hex") from None
    if len(value) > limit:
        raise UsageError(f"--{flag} is at most {limit} bytes")
    return value


class ContainerAttester:
    """A running enclave container's runtime as an attester: `clave attest ID --format cert` issues an RA-TLS
    certificate for a fresh key whose evidence comes from that container's enclave."""

    name = "container"

    def __init__(self, ctx: Any, container_id: str) -> None:
        from clave.engine.container import Engine

        self.engine = Engine(ctx.root, ctx.log)
        self.container_id = container_id
        self.tee = "enclave"
        self.insecure = False

    def attest(self, report_data: bytes) -> Any:
        import base64

        from clave.attestation.base import Evidence

        reply = self.engine.attest(self.container_id, report_data)
        self.tee, self.insecure = reply["tee"], bool(reply.get("insecure"))
        return Evidence(tee=reply["tee"], data=base64.b64decode(reply["evidence"]), insecure=self.insecure)


def run(parsed: Parsed, ctx: Any) -> int:
    import base64
    import hashlib

    from clave import fastjson
    from clave.attestation import registry
    from clave.attestation.base import AttesterUnavailable

    if len(parsed.args) > 1:  # `clave attest ID --nonce HEX`: flags may follow the container id
        from clave.cli.main import parse_flags

        parsed.flags.update(parse_flags(parsed.args[1:], FLAGS, "attest").flags)
        parsed.args = parsed.args[:1]
    if parsed.flags.get("kbs"):
        return _fetch(parsed, ctx)
    nonce = _hex(parsed.flags.get("nonce"), "nonce", 64)
    report_data = _hex(parsed.flags.get("report-data"), "report-data", 64)
    fmt = parsed.flags.get("format", "json")
    if fmt not in ("json", "cert"):
        raise UsageError(f"invalid format option {fmt!r}: use json or cert")
    if parsed.args and fmt == "json":
        from clave.engine.container import Engine

        data = report_data if report_data is not None else hashlib.sha256(nonce or b"").digest()
        reply = Engine(ctx.root, ctx.log).attest(parsed.args[0], data, nonce)
        print(fastjson.dumps_indented({**reply, "report_data": data.hex()}))
        return 0
    attester: Any
    try:
        attester = ContainerAttester(ctx, parsed.args[0]) if parsed.args else \
            registry.attester(parsed.flags.get("attester"))
    except (AttesterUnavailable, KeyError) as exc:
        raise ClaveError(f"attest: {exc}") from None
    if fmt == "cert":
        from clave.attestation import ratls

        cert = ratls.create_certificate(attester, nonce=nonce)
        evidence = cert.evidence
        text = cert.cert_pem().decode() + cert.key_pem().decode()
    else:
        data = report_data if report_data is not None else hashlib.sha256(nonce or b"").digest()
        evidence = attester.attest(data)
        text = fastjson.dumps_indented({
            "tee": evidence.tee, "attester": attester.name, "insecure": evidence.insecure,
            "report_data": data.hex(), "evidence": base64.b64encode(evidence.data).decode(),
        }) + "\n"
    if evidence.tee == "sample" or evidence.insecure:
        ctx.log.warning(f"attester {attester.name} is INSECURE: its evidence proves nothing about a TEE")
    out = parsed.flags.get("out")
    if out:
        import os

        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold a private key
        with os.fdopen(fd, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


def _fetch(parsed: Parsed, ctx: Any) -> int:
    """--kbs: attest to a key broker and write the released secret to --out (a tmpfs)."""
    url, resource, out = parsed.flags.get("kbs"), parsed.flags.get("resource"), parsed.flags.get("out")
    if not (url and resource and out):
        raise UsageError("usage: clave attest [ID] --kbs URL --resource REPO/TYPE/TAG --out PATH [--kbs-ca CA.pem]")
    ca = parsed.flags.get("kbs-ca")
    if parsed.args:
        from clave.engine.container import Engine

        ca_pem = None
        if ca:
            try:
                with open(ca) as f:
                    ca_pem = f.read()
            except OSError as exc:
                raise ClaveError(f"--kbs-ca {ca}: {exc.strerror}") from None
        Engine(ctx.root, ctx.log).fetch_secret(parsed.args[0], url, resource, out, ca_pem)
        return 0
    import os

    from clave.attestation import registry
    from clave.attestation.base import AttesterUnavailable
    from clave.enclave import provision
    from clave.enclave.runtime import EnclaveError
    from clave.kbs import client

    try:
        provision.check_tmpfs(out)  # before anything is released
        attester = registry.attester(parsed.flags.get("attester"))
        if getattr(attester, "insecure", False) or attester.tee == "sample":
            ctx.log.warning(f"attester {attester.name} is INSECURE: its evidence proves nothing about a TEE")
        secret = client.fetch_resource(url, resource, lambda data: (attester.tee, attester.attest(data).data),
                                       ca_file=ca)
        provision.write_secret(out, secret, os.geteuid(), os.getegid())
    except (AttesterUnavailable, KeyError, client.KbsError, EnclaveError) as exc:
        raise ClaveError(f"attest: {exc}") from None
    return 0
