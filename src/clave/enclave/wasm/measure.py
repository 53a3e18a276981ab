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

An app run by a language runtime (``python3 app.py``: see ``interpreters``) has its code in the image's files
and its arguments, so its measurement covers them: ``mrenclave`` = SHA-256(APP_DOMAIN || canonical JSON of the
*app manifest*) with the manifest holding the runtime's name and module digest, the digest of the file tree the
app can read (``tree_digest``), the arguments after the interpreter's name, the working directory, the
environment variables that choose code (``PYTHON*``) and the enclave config. One changed byte in any file of
the image changes it; data in OCI mounts (volumes, tmpfs) does not.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DOMAIN = b"clave-wasm-mrenclave/1\0"
APP_DOMAIN = b"clave-wasm-app-mrenclave/1\0"
# Image paths left out of the tree digest: where the app's signature travels, and what container runtimes
# mount over or create in every container (the kernel's file systems, /dev, the name and resolver files that
# CRI bind-mounts), so that an app signed from its bundle measures the same under containerd and Kubernetes.
SIGNATURE_DIR = ".clave"
RUNTIME_PATHS = frozenset({SIGNATURE_DIR, "proc", "sys", "dev", "etc/hosts", "etc/hostname", "etc/resolv.conf"})
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


def tree_digest(root: str, excluded: set[str] | frozenset[str] = frozenset()) -> bytes:
    """SHA-256 over every non-directory entry under ``root``, in byte order of path: its path, type, permission
    bits and content (a regular file's SHA-256, a symlink's target). Directories contribute only through their
    entries, so the empty mount points a runtime creates do not count; ``RUNTIME_PATHS`` and the ``excluded``
    subtrees (the OCI mount destinations) are skipped."""
    total = hashlib.sha256()
    pending = [b""]
    root_bytes = os.fsencode(root)
    skip = {os.fsencode(posixpath.normpath("/" + p).strip("/")) for p in excluded | RUNTIME_PATHS}
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(root_bytes, relative) if relative else root_bytes) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            path = relative + b"/" + entry.name if relative else entry.name
            if path in skip:
                continue
            st = entry.stat(follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFDIR:
                pending.append(path)
                continue
            if kind == stat.S_IFREG:
                with open(entry.path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").digest()
            elif kind == stat.S_IFLNK:
                content = os.readlink(entry.path)
            else:  # devices, fifos, sockets: only that they are there
                content = b""
            total.update(b"%s\0%o\0%d\0%s\n" % (path, stat.S_IMODE(st.st_mode), kind >> 12, content.hex().encode()))
    return total.digest()


def app_manifest(runtime: str, runtime_sha256: bytes, tree_sha256: bytes, args: list[str], cwd: str,
                 code_env: list[str], config: dict[str, int | None]) -> dict[str, Any]:
    """What an app's measurement covers (``args`` without the interpreter's name, which chose ``runtime``)."""
    return {"runtime": runtime, "runtime_sha256": runtime_sha256.hex(), "tree_sha256": tree_sha256.hex(),
            "args": list(args), "cwd": cwd, "env": list(code_env), "enclave_config": check_config(config)}


def bundle_manifest(language_name: str, code_env: list[str], runtime_sha256: bytes, rootfs: str,
                    oci_config: dict[str, Any], config: dict[str, int | None]) -> dict[str, Any]:
    """The app manifest of a container: its rootfs (less its OCI mount destinations) and its process."""
    process = oci_config.get("process", {})
    excluded = {m.get("destination", "") for m in oci_config.get("mounts", []) or []}
    return app_manifest(language_name, runtime_sha256, tree_digest(rootfs, excluded), process["args"][1:],
                        process.get("cwd") or "/", code_env, config)


def app_mrenclave(manifest: dict[str, Any]) -> bytes:
    return hashlib.sha256(APP_DOMAIN + fastjson.dumps(_sorted(manifest), compact=True).encode()).digest()


def _sorted(value: Any) -> Any:
    """Dicts with sorted keys, recursively: the canonical JSON the measurements hash."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value
