"""Remote attestation for Clave: evidence plugins, verification and attested TLS.

This package never imports the runtime. Plugins (attesters and verifiers) live in their own
modules and are found through :mod:`clave.attestation.registry`; the core never imports one directly.
"""

from clave.attestation.base import (
    Attester,
    AttesterUnavailable,
    Collateral,
    Evidence,
    Layer,
    Roots,
    VerificationError,
    VerifiedEvidence,
    Verifier,
    VerifyContext,
)

__all__ = [
    "Attester",
    "AttesterUnavailable",
    "Collateral",
    "Evidence",
    "Layer",
    "Roots",
    "VerificationError",
    "VerifiedEvidence",
    "Verifier",
    "VerifyContext",
]
