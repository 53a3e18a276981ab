"""Plugin registry: attesters and verifiers by name and priority, loaded lazily.

Plugins are named here by module path only, so importing the registry costs nothing and the core never
imports a plugin directly. A plugin module defines one or more Verifier/Attester subclasses and
lists them in a module-level ``PLUGINS`` tuple.
"""

from __future__ import annotations

import importlib

from clave.attestation.base import Attester, AttesterUnavailable, Verifier

# name -> module path. Add a plugin by adding a line.
VERIFIER_MODULES: dict[str, str] = {
    "sgx_ecdsa": "clave.attestation.verifiers.intel_dcap",
    "tdx_ecdsa": "clave.attestation.verifiers.intel_dcap",
    "snp": "clave.attestation.verifiers.amd_snp",
    "nitro": "clave.attestation.verifiers.aws_nitro",
    "tpm": "clave.attestation.verifiers.tpm",
    "wasm": "clave.attestation.verifiers.wasm",
    "sample": "clave.attestation.verifiers.sample",
}

ATTESTER_MODULES: dict[str, str] = {
    "sgx_ecdsa": "clave.attestation.attesters.sgx",
    "tdx_ecdsa": "clave.attestation.attesters.tdx",
    "snp": "clave.attestation.attesters.snp",
    "tpm": "clave.attestation.attesters.tpm",
    "wasm": "clave.enclave.wasm.attester",  # the runtime's own reports: registered by path, not imported
    "sample": "clave.attestation.attesters.sample",
}


def _load(modules: dict[str, str], base: type) -> dict[str, type]:
    found: dict[str, type] = {}
    for module_path in dict.fromkeys(modules.values()):
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            if exc.name == module_path:  # plugin not shipped in this build
                continue
            raise
        for cls in getattr(module, "PLUGINS", ()):
            if issubclass(cls, base):
                found[cls.name] = cls
    return found


def verifiers() -> list[type[Verifier]]:
    """All verifier classes, best (highest priority) first."""
    return sorted(_load(VERIFIER_MODULES, Verifier).values(), key=lambda c: -c.priority)


def attesters() -> list[type[Attester]]:
    return sorted(_load(ATTESTER_MODULES, Attester).values(), key=lambda c: -c.priority)


def verifier(name_or_tee: str) -> Verifier:
    for cls in verifiers():
        if name_or_tee in (cls.name, cls.tee):
            return cls()
    raise KeyError(f"no verifier named {name_or_tee!r}")


def verifier_for(evidence: bytes) -> Verifier:
    """Pick the verifier whose format sniff matches (``--tee auto``)."""
    for cls in verifiers():
        v = cls()
        if v.matches(evidence):
            return v
    raise KeyError("no verifier recognises this evidence")


def attester(name: str | None = None) -> Attester:
    """The named attester, or the best one available on this host."""
    reasons = []
    for cls in attesters():
        if name is not None and name not in (cls.name, cls.tee):
            continue
        a = cls()
        try:
            a.available()
        except AttesterUnavailable as exc:
            if name is not None:
                raise
            reasons.append(f"{cls.name}: {exc}")
            continue
        return a
    if name is not None:
        raise KeyError(f"no attester named {name!r}")
    raise AttesterUnavailable("no attester available: " + "; ".join(reasons))
