"""The ``sample`` verifier: checks evidence of the ``sample`` attester. INSECURE: it proves nothing.

It checks the evidence's format, its HMAC under the public development key (integrity against accidental
corruption only: anybody can compute it) and the binding of the report data. Accepting sample evidence
says nothing about where the code ran; every result carries ``insecure=True`` and a warning.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from clave.attestation.attesters.sample import DEVELOPMENT_KEY, MAC_SIZE, MAGIC, REPORT_DATA_SIZE
from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext

INSECURE_WARNING = "sample evidence is INSECURE: software-only, forgeable by anyone, proves nothing"


def _decode_body(body: bytes) -> dict[str, Any]:
    import cbor2

    try:
        fields = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise VerificationError(Layer.FORMAT, f"sample evidence body is not CBOR: {exc}") from None
    expected_types = {"measurement": bytes, "svn": int, "debug": bool, "report_data": bytes}
    if not isinstance(fields, dict) or set(fields) != set(expected_types):
        raise VerificationError(Layer.FORMAT, f"sample evidence must hold exactly {sorted(expected_types)}")
    for key, kind in expected_types.items():
        if not isinstance(fields[key], kind):
            raise VerificationError(Layer.FORMAT, f"sample evidence field {key!r} is not {kind.__name__}")
    if len(fields["measurement"]) != 32 or len(fields["report_data"]) != REPORT_DATA_SIZE:
        raise VerificationError(Layer.FORMAT, "sample evidence measurement or report data has the wrong size")
    return fields


class SampleVerifier(Verifier):
    name = "sample"
    tee = "sample"
    priority = 0

    def matches(self, evidence: bytes) -> bool:
        return evidence.startswith(MAGIC)

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        if not evidence.startswith(MAGIC) or len(evidence) < len(MAGIC) + MAC_SIZE + 1:
            raise VerificationError(Layer.FORMAT, "not sample evidence (bad magic or truncated)")
        signed, mac = evidence[:-MAC_SIZE], evidence[-MAC_SIZE:]
        if not hmac.compare_digest(mac, hmac.new(DEVELOPMENT_KEY, signed, hashlib.sha256).digest()):
            raise VerificationError(Layer.SIGNATURE, "sample evidence MAC does not verify")
        fields = _decode_body(signed[len(MAGIC) :])
        report_data: bytes = fields["report_data"]
        if ctx.expected_report_data is not None:
            if report_data != ctx.expected_report_data.ljust(REPORT_DATA_SIZE, b"\0"):
                raise VerificationError(Layer.KEY_BINDING, "report_data does not match the expected value")
        if ctx.nonce is not None and not report_data.startswith(ctx.nonce):
            raise VerificationError(Layer.FRESHNESS, "report_data does not start with the expected nonce")
        claims = {
            "measurement": fields["measurement"].hex(),
            "svn": fields["svn"],
            "debug": fields["debug"],
            "report_data": report_data.hex(),
        }
        return VerifiedEvidence(tee=self.tee, claims=claims, insecure=True, warnings=[INSECURE_WARNING])


PLUGINS = (SampleVerifier,)
