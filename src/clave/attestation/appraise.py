"""Evidence + context + policy -> a verdict. Shared by the CLI, attested TLS and the relay.

``appraise`` never raises for bad evidence: it returns a rejected Verdict naming the failing layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clave.attestation import registry
from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext
from clave.attestation.policy import DEFAULT_POLICY, Policy


class UnknownTee(LookupError):
    """No verifier of that name/TEE is shipped in this build (a usage error)."""


@dataclass
class Verdict:
    accepted: bool
    tee: str | None
    claims: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    layer: Layer | None = None
    insecure: bool = False
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": "accepted" if self.accepted else "rejected",
            "tee": self.tee,
            "claims": self.claims,
            "reason": self.reason,
        }
        if self.layer is not None:
            out["layer"] = self.layer.value
        out["insecure"] = self.insecure
        out["warnings"] = self.warnings
        return out


def pick_verifier(evidence: bytes, tee: str = "auto") -> Verifier:
    """The verifier named by ``tee`` (a TEE or plugin name), or the one whose sniff matches for "auto".

    Raises UnknownTee for a name no plugin has, VerificationError(FORMAT) when auto finds none.
    """
    if tee == "auto":
        try:
            return registry.verifier_for(evidence)
        except KeyError:
            raise VerificationError(Layer.FORMAT, "no verifier recognises this evidence; name one") from None
    try:
        return registry.verifier(tee)
    except KeyError:
        shipped = sorted({c.tee for c in registry.verifiers()})
        raise UnknownTee(f"no verifier for {tee!r} in this build (available: {', '.join(shipped)})") from None


def _report_data(verified: VerifiedEvidence) -> bytes | None:
    """The fixed-size report data field (SGX, TDX, SNP, sample), or None for evidence without one."""
    value = verified.claims.get("report_data")
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def check_bound(verified: VerifiedEvidence, expected: bytes, layer: Layer, what: str) -> None:
    """Defence in depth on top of the verifier's own check of ``ctx.expected_report_data``: a report data
    field must hold ``expected`` (both zero-padded alike). Evidence that binds data another way (a TPM's
    qualifying data, a Nitro document's user_data) is left to its verifier, which the contract obliges."""
    carried = _report_data(verified)
    if carried is None:
        return
    size = max(len(carried), len(expected))
    if carried.ljust(size, b"\0") != expected.ljust(size, b"\0"):
        raise VerificationError(layer, f"report data does not match {what}")


def check_nonce(verified: VerifiedEvidence, nonce: bytes) -> None:
    """A nonce given by the caller must lead the report data. TPM and Nitro verifiers check ``ctx.nonce``
    against their own nonce fields; the report-data TEEs (SGX, TDX, SNP) carry it in report data."""
    carried = _report_data(verified)
    if carried is not None and not carried.startswith(nonce):
        raise VerificationError(Layer.FRESHNESS, "report data does not start with the expected nonce")


def run_verifier(verifier: Verifier, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
    """``verifier.verify``, with any unexpected exception on hostile input turned into a FORMAT rejection
    (a verifier that trips over malformed evidence has still not accepted it)."""
    try:
        return verifier.verify(evidence, ctx)
    except VerificationError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise VerificationError(Layer.FORMAT, f"{verifier.name} verifier failed on this evidence ({why})") from exc


def appraise(
    evidence: bytes,
    *,
    tee: str = "auto",
    ctx: VerifyContext | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> Verdict:
    """Verify ``evidence`` and apply ``policy``. ``ctx.nonce``, when set, must be what the evidence
    carries as its nonce (TPM extraData, Nitro nonce) or lead its report data (SGX, TDX, SNP, sample)."""
    ctx = ctx or VerifyContext()
    tee_name: str | None = None if tee == "auto" else tee
    try:
        verifier = pick_verifier(evidence, tee)
        tee_name = verifier.tee
        verified = run_verifier(verifier, evidence, ctx)
        if ctx.nonce is not None:
            check_nonce(verified, ctx.nonce)
        if ctx.expected_report_data is not None:
            check_bound(verified, ctx.expected_report_data, Layer.KEY_BINDING, "the expected value")
        warnings = list(verified.warnings) + policy.check(verified)
    except VerificationError as exc:
        return Verdict(False, tee_name, reason=str(exc), layer=exc.layer)
    return Verdict(True, verified.tee, verified.as_json(), None, None, verified.insecure, warnings)
