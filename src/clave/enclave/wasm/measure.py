"""Enclave identity of a WebAssembly module: the MRENCLAVE and MRSIGNER analogues.

``mrenclave`` = SHA-256(DOMAIN || SHA-256(module bytes) || canonical JSON of the enclave config). The enclave
config holds what shapes the module's execution and is fixed when the module is signed, as SGX fixes an
enclave's heap size in its SIGSTRUCT:

- ``memory_limit``: the cap on the guest's linear memory in bytes (from ``linux.resources.memory.limit``);
- ``cpu_time_limit``: the guest's CPU-time budget in seconds (from the ``RLIMIT_CPU`` soft limit in
  ``process.rlimits``).

``null`` means unlimited. The container's own OCI limits may only tighten these at run time (see
``effective_limits``); they never change the measurement. Not covered, on purpose: args, env, stdio and the
file tree (untrusted inputs, as for an SGX enclave), and the CPU *rate* (``cpu.quota/period``, which the
container's cgroup enforces on the thread running the guest).

``mrsigner`` = SHA-256 of the signer's public key (DER SubjectPublicKeyInfo).
"""

from __future__ import annotations

import hashlib

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DOMAIN = b"clave-wasm-mrenclave/1\0"
CONFIG_KEYS = ("memory_limit", "cpu_time_limit")
RLIMIT_CPU = "RLIMIT_CPU"


def enclave_config(oci_config: dict[str, Any] | None) -> dict[str, int | None]:
    """The measured enclave config from an OCI config (``{}`` or None: unlimited)."""
    oci = oci_config or {}
    memory = oci.get("linux", {}).get("resources", {}).get("memory", {}).get("limit")
    cpu_time = None
    for rlimit in oci.get("process", {}).get("rlimits", []) or []:
        if rlimit.get("type") == RLIMIT_CPU:
            cpu_time = rlimit.get("soft")
    return {
        "memory_limit": memory if isinstance(memory, int) and memory > 0 else None,
        "cpu_time_limit": cpu_time if isinstance(cpu_time, int) and 0 <= cpu_time < 2**63 - 1 else None,
    }


def check_config(config: object) -> dict[str, int | None]:
    """Validate an enclave config read from a signature file."""
    if not isinstance(config, dict) or set(config) != set(CONFIG_KEYS):
        raise ValueError(f"enclave config must hold exactly {list(CONFIG_KEYS)}")
    for key in CONFIG_KEYS:
        value = config[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"enclave config {key} must be a non-negative integer or null")
    return {key: config[key] for key in CONFIG_KEYS}


def canonical(config: dict[str, int | None]) -> bytes:
    """Sorted keys, no spaces, ASCII (what json.dumps(sort_keys=True, separators=(",", ":")) writes), through
    the C encoder so the start path does not import json."""
    return fastjson.dumps(dict(sorted(config.items())), compact=True).encode()


def module_digest(module: bytes) -> bytes:
    return hashlib.sha256(module).digest()


def mrenclave(digest: bytes, config: dict[str, int | None]) -> bytes:
    """The measurement of a module (given by its SHA-256) under an enclave config."""
    return hashlib.sha256(DOMAIN + digest + canonical(check_config(config))).digest()


def mrsigner(public_key_der: bytes) -> bytes:
    return hashlib.sha256(public_key_der).digest()


def effective_limits(signed: dict[str, int | None], oci: dict[str, int | None]) -> dict[str, int | None]:
    """The limits that apply: the tighter of the signed enclave config and the container's OCI limits."""
    out: dict[str, int | None] = {}
    for key in CONFIG_KEYS:
        values = [v for v in (signed.get(key), oci.get(key)) if v is not None]
        out[key] = min(values) if values else None
    return out
