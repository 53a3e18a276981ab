"""The ``wasm`` verifier: local reports of the built-in WebAssembly enclave runtime. INSECURE: software only.

It checks the report's format, its Ed25519 signature under the host platform key given as collateral
(``wasm_platform_key.pem``, the public key from ``/var/lib/clave/wasm-platform-key.pem``) and the binding of
the report data. Without that collateral it refuses, unless trust on first use was asked for explicitly
(``WasmVerifier(trust_on_first_use=True)`` or ``CLAVE_WASM_TRUST_ON_FIRST_USE=1``): then the key embedded in
the report is used, which proves only that the report is intact. Either way the enclave is protected by
software isolation on a host that could forge the report: every result carries ``insecure=True``.
"""

from __future__ import annotations

import os

from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext

PLATFORM_KEY_ROLE = "wasm_platform_key.pem"
ENV_TOFU = "CLAVE_WASM_TRUST_ON_FIRST_USE"
INSECURE_WARNING = ("wasm evidence is INSECURE: software isolation and a host-held signing key, "
                    "no hardware memory encryption")
TOFU_WARNING = "wasm platform key trusted on first use: the report's own key was not checked against collateral"


class WasmVerifier(Verifier):
    name = "wasm"
    tee = "wasm"
    priority = 5

    def __init__(self, trust_on_first_use: bool | None = None) -> None:
        if trust_on_first_use is None:
            trust_on_first_use = os.environ.get(ENV_TOFU) == "1"
        self.trust_on_first_use = trust_on_first_use

    def matches(self, evidence: bytes) -> bool:
        from clave.attestation.wasm_report import MAGIC

        return evidence.startswith(MAGIC)

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        from clave.attestation import wasm_report as report

        try:
            fields, signed, signature = report.parse_report(evidence)
        except report.ReportError as exc:
            raise VerificationError(Layer.FORMAT, str(exc)) from None
        warnings = [INSECURE_WARNING]
        embedded = Ed25519PublicKey.from_public_bytes(fields["platform_key"])
        pem = ctx.collateral.get(PLATFORM_KEY_ROLE)
        if pem is not None:
            try:
                trusted = serialization.load_pem_public_key(pem)
            except ValueError as exc:
                raise VerificationError(Layer.COLLATERAL, f"{PLATFORM_KEY_ROLE} is not a PEM public key: {exc}"
                                        ) from None
            if not isinstance(trusted, Ed25519PublicKey):
                raise VerificationError(Layer.COLLATERAL, f"{PLATFORM_KEY_ROLE} is not an Ed25519 public key")
            raw = trusted.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if raw != fields["platform_key"]:
                raise VerificationError(Layer.SIGNATURE, "wasm report is signed by another platform key")
        elif self.trust_on_first_use:
            trusted = embedded
            warnings.append(TOFU_WARNING)
        else:
            raise VerificationError(Layer.COLLATERAL, f"no {PLATFORM_KEY_ROLE} given: the wasm platform key must be "
                                    f"known (or trust on first use allowed with {ENV_TOFU}=1)")
        try:
            report.check_signature(signed, signature, trusted)
        except report.ReportError as exc:
            raise VerificationError(Layer.SIGNATURE, str(exc)) from None
        report_data: bytes = fields["report_data"]
        if ctx.expected_report_data is not None:
            if report_data != ctx.expected_report_data.ljust(report.REPORT_DATA_SIZE, b"\0"):
                raise VerificationError(Layer.KEY_BINDING, "report_data does not match the expected value")
        if ctx.nonce is not None and not report_data.startswith(ctx.nonce):
            raise VerificationError(Layer.FRESHNESS, "report_data does not start with the expected nonce")
        claims = {
            "mrenclave": fields["mrenclave"].hex(),
            "mrsigner": fields["mrsigner"].hex(),
            "report_data": report_data.hex(),
            "debug": fields["debug"],
        }
        return VerifiedEvidence(tee=self.tee, claims=claims, insecure=True, warnings=warnings)


PLUGINS = (WasmVerifier,)
