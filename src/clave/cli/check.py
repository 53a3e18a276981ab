"""check: report what this host supports: cgroups, seccomp, enclave types, attesters, VM acceleration.

usage: clave check [--format text|json]
"""

from __future__ import annotations

import os
import shutil
import subprocess

from clave import fastjson
from clave.cli.main import Parsed, UsageError
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {"format": ("str", ("f",)), "help": ("bool", ("h",))}


def enclave_types() -> dict[str, str]:
    from clave.enclave import config as enclave_config

    report = {}
    for kind, devices in enclave_config.HARDWARE_DEVICES.items():
        found = enclave_config.devices_present(kind)
        report[kind] = f"supported ({', '.join(found)})" if found else f"no: none of {', '.join(devices)}"
    try:
        import importlib.util

        wasm = importlib.util.find_spec("wasmtime") is not None
    except (ImportError, ValueError):
        wasm = False
    report["wasm"] = "supported (insecure: software isolation)" if wasm else "no: wasmtime is not installed"
    report["software"] = "supported (insecure: development only)"
    return report


def language_runtimes() -> dict[str, str]:
    """The WebAssembly builds of Python and JavaScript, and whether this host has compiled them yet."""
    from clave.enclave.wasm import cache, compiler, interpreters

    report = {}
    for language in (interpreters.PYTHON, interpreters.JAVASCRIPT):
        try:
            path = language.module_path()
        except FileNotFoundError as exc:
            report[language.name] = f"no: {exc}"
            continue
        state = "not compiled yet (the first container compiles it; or run 'clave enclave compile')"
        try:
            store = cache.ModuleCache()
            store.open()
            fd = store.open_verified(compiler.cache_key(store.file_digest(path)))
            if fd is not None:
                os.close(fd)
                state = "compiled"
        except (OSError, cache.CacheError) as exc:
            state = f"cache unusable: {exc}"
        report[language.name] = f"supported ({path}; {state})"
    return report


def attesters() -> dict[str, str]:
    from clave.attestation import registry
    from clave.attestation.base import AttesterUnavailable

    report = {}
    for cls in registry.attesters():
        try:
            cls().available()
            report[cls.name] = "available"
        except AttesterUnavailable as exc:
            report[cls.name] = f"unavailable: {exc}"
        except Exception as exc:  # a plugin that cannot even probe says why
            report[cls.name] = f"unavailable: {exc}"
    return report


def vm_acceleration() -> str:
    """The hypervisor driver's verdict: KVM only when a probe booted the real guest under it, else TCG, and why."""
    if shutil.which("qemu-system-x86_64") is None:
        return "none: qemu-system-x86_64 is not installed"
    from clave.vm import acceleration

    verdict = acceleration()
    return f"{verdict.accel}: {verdict.reason}" if verdict.reason else verdict.accel


def vm_guest() -> str:
    """Whether `clave vm build-guest` has built the guest, and its digests."""
    from clave.vm import current_guest
    from clave.vm.errors import BuildError

    try:
        guest = current_guest()
        digests = guest.digests()
    except (BuildError, OSError) as exc:
        return f"not built ({exc}): run `clave vm build-guest`"
    return "built: " + ", ".join(f"{name} {value[:16]}" for name, value in sorted(digests.items()))


def vm_attestation() -> str:
    """What a vm container's guest attests with: its vTPM here; confidential guests (TDX, SEV-SNP) only where
    KVM runs them, which this build does not wire yet: say why not."""
    from clave.vm.qemu import FIRMWARE, QEMU

    try:  # the confidential-guest objects QEMU would need (sev-snp-guest: QEMU 9.1, tdx-guest: 10.0)
        objects = subprocess.run([QEMU, "-object", "help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        objects = ""
    reasons = []
    for module, param, tee, qemu_object in (("kvm_intel", "tdx", "TDX", "tdx-guest"),
                                            ("kvm_amd", "sev_snp", "SEV-SNP", "sev-snp-guest")):
        try:
            with open(f"/sys/module/{module}/parameters/{param}") as f:
                enabled = f.read().strip() in ("Y", "1")
        except OSError:
            enabled = False
        missing = [f"{module} {param}"] if not enabled else []
        if qemu_object not in objects.split():
            missing.append(f"QEMU's {qemu_object} object")
        verdict = f"no ({', '.join(missing)})" if missing else "host and QEMU support present, not wired in Clave yet"
        reasons.append(f"{tee}: {verdict}")

    try:  # the guest's side of a TEE report
        from clave.vm.guest import current_guest

        release = current_guest().kernel_release
        if tuple(int(n) for n in release.split(".")[:2]) < (6, 7):
            reasons.append(f"guest kernel {release} has no configfs-tsm (6.7+)")
    except (ClaveError, ValueError):
        pass
    tpm = "vTPM (swtpm, OVMF)" if os.path.exists(FIRMWARE) and shutil.which("swtpm") else \
        "none: install swtpm and ovmf for a vTPM"
    return f"{tpm}; confidential guests: " + ", ".join(reasons)


def report() -> dict[str, Any]:
    from clave.linux import cgroups

    return {
        "cgroups": cgroups.detect_mode(),
        "seccomp": os.path.exists("/proc/sys/kernel/seccomp/actions_avail"),
        "lsm": {
            "apparmor": os.path.isdir("/sys/kernel/security/apparmor"),
            "selinux": os.path.isdir("/sys/fs/selinux"),
        },
        "handlers": {"native": "supported", "enclave": "supported",
                     "vm": "supported (QEMU with the guest below; see vm_acceleration)"},
        "enclave_types": enclave_types(),
        "language_runtimes": language_runtimes(),
        "attesters": attesters(),
        "vm_acceleration": vm_acceleration(),
        "vm_guest": vm_guest(),
        "vm_attestation": vm_attestation(),
    }


def run(parsed: Parsed, ctx: Any) -> int:
    fmt = parsed.flags.get("format", "text")
    doc = report()
    if fmt == "json":
        print(fastjson.dumps_indented(doc))
    elif fmt == "text":
        for key, value in doc.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for name, what in value.items():
                    print(f"  {name:<18} {what}")
            else:
                print(f"{key:<20} {value}")
    else:
        raise UsageError(f"invalid format option {fmt!r}: use text or json")
    return 0
