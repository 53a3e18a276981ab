"""Appraisal policies: which verified claims a relying party accepts.

A policy is a JSON object::

    {"allowed_tcb_status": ["UpToDate", ...] or ["*"],
     "allow_debug": false,
     "reference_values": {"mrenclave": ["<hex>", ...], "pcrs.7": ["<hex>"]},
     "min_svn": {"isv_svn": 3}}

Every key is optional. Claim names are those the verifiers emit; a dotted name reaches into a nested claim
(``pcrs.7``). Hex strings compare case-insensitively. Evidence without a TCB status (Nitro, TPM, sample)
passes the ``allowed_tcb_status`` check. A rejection raises ``VerificationError(Layer.POLICY, ...)`` whose
reason names the claim.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clave.attestation.base import Layer, VerificationError, VerifiedEvidence

DEFAULT_ALLOWED_TCB_STATUS = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
)
NO_REFERENCE_VALUES_WARNING = "policy pins no reference values: any measurement is accepted"
_KEYS = {"allowed_tcb_status", "allow_debug", "reference_values", "min_svn"}
_MISSING = object()


class PolicyError(ValueError):
    """The policy file itself is malformed (a usage error, not a rejection)."""


def _normalise(value: Any) -> Any:
    """Make claim values and reference values comparable: hex/str case-insensitive, bools kept apart."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        return text[2:] if text.startswith("0x") else text
    if isinstance(value, int):
        return str(value)  # so that 1 and "1" compare equal
    return value


def _lookup(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, Mapping) and part.isdigit() and int(part) in value:
            value = value[int(part)]
        else:
            return _MISSING
    return value


@dataclass(frozen=True)
class Policy:
    allowed_tcb_status: tuple[str, ...] = DEFAULT_ALLOWED_TCB_STATUS
    allow_debug: bool = False
    reference_values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    min_svn: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        if not isinstance(data, Mapping):
            raise PolicyError("policy must be a JSON object")
        unknown = set(data) - _KEYS
        if unknown:
            raise PolicyError(f"unknown policy keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        statuses = data.get("allowed_tcb_status", list(DEFAULT_ALLOWED_TCB_STATUS))
        if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
            raise PolicyError("allowed_tcb_status must be a list of strings")
        allow_debug = data.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise PolicyError("allow_debug must be true or false")
        refs = data.get("reference_values", {})
        if not isinstance(refs, Mapping) or not all(isinstance(v, list) and v for v in refs.values()):
            raise PolicyError("reference_values must map claim names to non-empty lists of accepted values")
        min_svn = data.get("min_svn", {})
        if not isinstance(min_svn, Mapping) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in min_svn.values()
        ):
            raise PolicyError("min_svn must map claim names to integers")
        return cls(
            allowed_tcb_status=tuple(statuses),
            allow_debug=allow_debug,
            reference_values={str(k): tuple(v) for k, v in refs.items()},
            min_svn={str(k): int(v) for k, v in min_svn.items()},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Policy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise PolicyError(f"cannot read policy {os.fspath(path)}: {exc.strerror}") from None
        return cls.from_json(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed_tcb_status": list(self.allowed_tcb_status),
            "allow_debug": self.allow_debug,
            "reference_values": {k: list(v) for k, v in self.reference_values.items()},
            "min_svn": dict(self.min_svn),
        }

    def warnings(self) -> list[str]:
        return [] if self.reference_values else [NO_REFERENCE_VALUES_WARNING]

    def check(self, verified: VerifiedEvidence) -> list[str]:
        """Raise VerificationError(Layer.POLICY) unless the claims satisfy this policy; return warnings."""
        status = verified.tcb_status
        allowed_status = self.allowed_tcb_status
        if status is not None and "*" not in allowed_status and status not in allowed_status:
            allowed = ", ".join(self.allowed_tcb_status) or "none"
            raise VerificationError(Layer.POLICY, f"tcb_status {status} is not allowed (allowed: {allowed})")
        claims = verified.as_json()
        if claims.get("debug") is True and not self.allow_debug:
            raise VerificationError(Layer.POLICY, "debug: the TEE runs in debug mode, allow_debug is false")
        for name, accepted in self.reference_values.items():
            value = _lookup(claims, name)
            if value is _MISSING:
                raise VerificationError(Layer.POLICY, f"{name}: claim absent from {verified.tee} evidence")
            if _normalise(value) not in {_normalise(a) for a in accepted if not isinstance(a, list | dict)}:
                raise VerificationError(Layer.POLICY, f"{name}: {value} is not an accepted reference value")
        for name, minimum in self.min_svn.items():
            value = _lookup(claims, name)
            if value is _MISSING:
                raise VerificationError(Layer.POLICY, f"{name}: claim absent from {verified.tee} evidence")
            if isinstance(value, bool) or not isinstance(value, int):
                raise VerificationError(Layer.POLICY, f"{name}: {value!r} is not a number (min_svn)")
            if value < minimum:
                raise VerificationError(Layer.POLICY, f"{name}: {value} is below the minimum {minimum}")
        return self.warnings()


DEFAULT_POLICY = Policy()
