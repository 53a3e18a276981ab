"""The plugin contracts shared by every attester and verifier.

A verifier turns evidence bytes into claims in one common form, or raises VerificationError naming the
layer that failed. An attester produces evidence whose report data carries caller-chosen bytes.
"""

from __future__ import annotations

import datetime as _dt
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class Layer(enum.StrEnum):
    """Which layer of a verification failed; appears in every rejection reason."""

    FORMAT = "evidence format"  # unparsable, truncated, wrong version
    SIGNATURE = "evidence signature"  # the evidence's own signature does not verify
    CHAIN = "certificate chain"  # signer certificate does not chain to a trusted root, or expired/revoked
    COLLATERAL = "collateral"  # TCB info / QE identity / CRL missing, malformed, badly signed or expired
    TCB = "tcb"  # platform TCB not acceptable (no matching level, revoked)
    KEY_BINDING = "key binding"  # report data does not bind the expected key / claims
    FRESHNESS = "freshness"  # nonce missing, wrong or replayed; session expired
    POLICY = "policy"  # claims do not satisfy the appraisal policy


class VerificationError(Exception):
    """Evidence was rejected. ``str()`` is one line: '<layer>: <why>'."""

    def __init__(self, layer: Layer, message: str) -> None:
        super().__init__(f"{layer.value}: {message}")
        self.layer = layer
        self.message = message


class AttesterUnavailable(Exception):
    """The attester's device or service is absent on this host; the message says which."""


@dataclass(frozen=True)
class Evidence:
    """Evidence as produced by an attester: which TEE, and its raw bytes."""

    tee: str
    data: bytes
    insecure: bool = False  # true for software-only evidence (sample, wasm without hardware)


@dataclass
class VerifiedEvidence:
    """What a verifier concluded: the TEE, its claims (JSON-ready, hex lowercase) and the TCB status."""

    tee: str
    claims: dict[str, Any]
    tcb_status: str | None = None
    insecure: bool = False
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        claims = dict(self.claims)
        if self.tcb_status is not None:
            claims["tcb_status"] = self.tcb_status
        return claims


class Collateral:
    """Verification collateral named by role (``tcb_info.json``, ``vcek.der``...).

    Backed by a directory (``--collateral DIR``) and/or explicit bytes; roles absent from both are None.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, **items: bytes) -> None:
        self.directory = Path(directory) if directory else None
        self._items = {k.replace("__", "."): v for k, v in items.items()}

    def set(self, role: str, data: bytes) -> None:
        self._items[role] = data

    def get(self, role: str) -> bytes | None:
        if role in self._items:
            return self._items[role]
        if self.directory is not None:
            path = self.directory / role
            if path.is_file():
                return path.read_bytes()
        return None

    def __contains__(self, role: str) -> bool:
        return self.get(role) is not None


_PACKAGED_ROOTS = Path(__file__).with_name("roots")


class Roots:
    """Vendor trust anchors by name (file stem), e.g. ``intel_sgx_root_ca``, ``amd_milan_ark``,
    ``aws_nitro_enclaves_root_g1``. Packaged with Clave; ``--roots DIR`` overrides them."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory else _PACKAGED_ROOTS

    def pem(self, name: str) -> bytes:
        for candidate in (self.directory / f"{name}.pem", _PACKAGED_ROOTS / f"{name}.pem"):
            if candidate.is_file():
                return candidate.read_bytes()
        raise VerificationError(Layer.CHAIN, f"trust anchor {name!r} not found in {self.directory}")

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.pem"))


@dataclass
class VerifyContext:
    """Everything a verifier may need beyond the evidence itself."""

    now: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.UTC))
    collateral: Collateral = field(default_factory=Collateral)
    roots: Roots = field(default_factory=Roots)
    # Expected report data (e.g. hash of claims bound by attested TLS); checked by the verifier when set.
    expected_report_data: bytes | None = None
    nonce: bytes | None = None


class Verifier:
    """A verifier plugin. Subclasses set ``name``, ``tee`` and ``priority`` and implement ``verify``."""

    name: ClassVar[str]
    tee: ClassVar[str]
    priority: ClassVar[int] = 50

    def matches(self, evidence: bytes) -> bool:
        """Cheap sniff used by ``--tee auto``: does this look like our evidence format?"""
        return False

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        raise NotImplementedError


class Attester:
    """An attester plugin: produces evidence with ``report_data`` (up to 64 bytes) bound in it."""

    name: ClassVar[str]
    tee: ClassVar[str]
    priority: ClassVar[int] = 50

    def available(self) -> None:
        """Raise AttesterUnavailable with a clear reason when this host cannot produce such evidence."""

    def attest(self, report_data: bytes) -> Evidence:
        raise NotImplementedError
