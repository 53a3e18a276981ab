"""Resource policy: which verified claims may read which resources. Default deny.

A JSON object mapping resource patterns to lists of rules::

    {
      "default/key/*":  [{"tee": ["sgx"], "reference_values": {"mrenclave": ["<hex>"]}, "min_svn": {"isv_svn": 2}}],
      "*/config/*":     [{"tee": ["snp", "tdx"]}]
    }

A pattern is ``repo/type/tag``; each component is matched as a shell glob (``*`` matches any one component).
A rule is Clave's appraisal policy (``allowed_tcb_status``, ``allow_debug``, ``reference_values``, ``min_svn``:
see :mod:`clave.attestation.policy`) plus ``tee``, the TEE names it admits (any when absent). A resource is
released when some rule of some matching pattern accepts the claims; otherwise the refusal names why.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clave import fastjson
from clave.attestation.base import VerificationError, VerifiedEvidence
from clave.attestation.policy import Policy, PolicyError


@dataclass(frozen=True)
class Rule:
    tees: tuple[str, ...] | None
    policy: Policy

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Rule:
        if not isinstance(data, Mapping):
            raise PolicyError(f"{where}: a rule must be a JSON object")
        body = dict(data)
        tees = body.pop("tee", None)
        if tees is not None and (not isinstance(tees, list) or not all(isinstance(t, str) for t in tees)):
            raise PolicyError(f"{where}: tee must be a list of TEE names")
        try:
            policy = Policy.from_dict(body)
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        return cls(tuple(tees) if tees is not None else None, policy)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.tees is None else {"tee": list(self.tees)}
        out.update(self.policy.to_dict())
        return out

    def refusal(self, verified: VerifiedEvidence) -> str | None:
        """None when this rule accepts the claims, else why not."""
        if self.tees is not None and verified.tee not in self.tees:
            return f"tee {verified.tee} is not among {', '.join(self.tees) or 'none'}"
        try:
            self.policy.check(verified)
        except VerificationError as exc:
            return exc.message
        return None


@dataclass(frozen=True)
class ResourcePolicy:
    entries: tuple[tuple[str, tuple[Rule, ...]], ...] = ()

    @classmethod
    def from_dict(cls, data: Any) -> ResourcePolicy:
        if not isinstance(data, Mapping):
            raise PolicyError("resource policy must be a JSON object mapping repo/type/tag patterns to rule lists")
        entries = []
        for pattern, rules in data.items():
            if not isinstance(pattern, str) or len(pattern.split("/")) != 3 or not all(pattern.split("/")):
                raise PolicyError(f"resource pattern {pattern!r} is not repo/type/tag")
            if not isinstance(rules, list):
                raise PolicyError(f"{pattern}: rules must be a list")
            parsed = tuple(Rule.from_dict(rule, f"{pattern} rule {i + 1}") for i, rule in enumerate(rules))
            entries.append((pattern, parsed))
        return cls(tuple(entries))

    @classmethod
    def from_json(cls, text: str | bytes) -> ResourcePolicy:
        try:
            data = fastjson.loads(text)
        except ValueError as exc:
            raise PolicyError(f"resource policy is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {pattern: [rule.to_dict() for rule in rules] for pattern, rules in self.entries}

    def refusal(self, resource: str, verified: VerifiedEvidence) -> str | None:
        """None when ``resource`` may be released to ``verified``, else one line saying why not."""
        parts = resource.split("/")
        reasons = []
        matched = False
        for pattern, rules in self.entries:
            if not all(fnmatch.fnmatchcase(p, g) for p, g in zip(parts, pattern.split("/"), strict=True)):
                continue
            matched = True
            for i, rule in enumerate(rules):
                why = rule.refusal(verified)
                if why is None:
                    return None
                reasons.append(f"{pattern} rule {i + 1}: {why}")
            if not rules:
                reasons.append(f"{pattern}: no rules (denies all)")
        if not matched:
            return f"no policy entry covers {resource} (default deny)"
        return f"{resource} denied: " + "; ".join(reasons)


def verified_from_claims(tee: str, claims: Mapping[str, Any]) -> VerifiedEvidence:
    """Rebuild what the verifier concluded from the claims a token or session carries (``Verdict.claims``
    merges ``tcb_status`` into the claims)."""
    rest = dict(claims)
    status = rest.pop("tcb_status", None)
    return VerifiedEvidence(tee=tee, claims=rest, tcb_status=status if isinstance(status, str) else None)
