"""Which containers are enclave containers, and with what settings (rune's rules).

Each setting is read from ``process.env`` first (and removed from the container's environment), then from the
annotations. ``ENCLAVE_RUNTIME_ARGS`` turns commas into spaces, as rune does.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# setting -> (env name, annotation name)
SETTINGS = {
    "type": ("ENCLAVE_TYPE", "enclave.type"),
    "runtime_path": ("ENCLAVE_RUNTIME_PATH", "enclave.runtime.path"),
    "runtime_args": ("ENCLAVE_RUNTIME_ARGS", "enclave.runtime.args"),
    "log_level": ("ENCLAVE_RUNTIME_LOGLEVEL", "enclave.runtime.loglevel"),
    # Clave's own: what the enclave runtime provisions for the app before it runs (see clave.enclave.provision)
    "attestation_dir": ("ENCLAVE_ATTESTATION_DIR", "enclave.attestation.dir"),
    "kbs_url": ("ENCLAVE_KBS_URL", "enclave.kbs.url"),
    "kbs_resources": ("ENCLAVE_KBS_RESOURCES", "enclave.kbs.resources"),
    "kbs_ca": ("ENCLAVE_KBS_CA", "enclave.kbs.ca"),
}

# Enclave types and the host devices each needs (rune's rule for the hardware ones).
HARDWARE_DEVICES: dict[str, tuple[str, ...]] = {
    "intelSgx": ("/dev/sgx_enclave", "/dev/sgx/enclave", "/dev/isgx"),
    "AwsNitroEnclaves": ("/dev/nitro_enclaves",),
    "Jailhouse": ("/dev/jailhouse",),
}
SOFTWARE_TYPES = ("wasm", "software")
TYPES = (*HARDWARE_DEVICES, *SOFTWARE_TYPES)
SGX_AESM_SOCKET = "/var/run/aesmd/aesm.socket"


class EnclaveConfigError(Exception):
    """The enclave settings are missing or wrong; one line."""


def is_enclave(config: dict[str, Any]) -> bool:
    env_name, annotation = SETTINGS["type"]
    prefix = env_name + "="
    if any(e.startswith(prefix) and len(e) > len(prefix) for e in config.get("process", {}).get("env", [])):
        return True
    return bool(config.get("annotations", {}).get(annotation))


def extract(config: dict[str, Any]) -> dict[str, str]:
    """The enclave settings; removes the ENCLAVE_* variables from the container's environment."""
    process = config.setdefault("process", {})
    env = process.get("env", [])
    settings: dict[str, str] = {}
    keep = []
    names = {env_name: key for key, (env_name, _) in SETTINGS.items()}
    for entry in env:
        name, _, value = entry.partition("=")
        if name in names:
            settings.setdefault(names[name], value)
        else:
            keep.append(entry)
    process["env"] = keep
    annotations = config.get("annotations", {})
    for key, (_, annotation) in SETTINGS.items():
        if key not in settings and annotations.get(annotation):
            settings[key] = annotations[annotation]
    if "runtime_args" in settings:
        settings["runtime_args"] = settings["runtime_args"].replace(",", " ")
    settings.setdefault("runtime_args", "")
    settings.setdefault("log_level", "info")
    enclave_type = settings.get("type", "")
    if enclave_type not in TYPES:
        raise EnclaveConfigError(f"unknown enclave type {enclave_type!r} (supported: {', '.join(TYPES)})")
    return settings


def devices_present(enclave_type: str) -> list[str]:
    return [d for d in HARDWARE_DEVICES.get(enclave_type, ()) if os.path.exists(d)]


def check_host(settings: dict[str, str]) -> list[str]:
    """Fail clearly when the host cannot run this type; returns the host devices to give the container."""
    enclave_type = settings["type"]
    if enclave_type in HARDWARE_DEVICES:
        found = devices_present(enclave_type)
        if not found:
            what = {"intelSgx": "no SGX here", "AwsNitroEnclaves": "no Nitro Enclaves here",
                    "Jailhouse": "no Jailhouse here"}[enclave_type]
            raise EnclaveConfigError(
                f"enclave type {enclave_type}: {what} (none of {', '.join(HARDWARE_DEVICES[enclave_type])} exists)"
            )
        return found
    return []


def validate_pal_path(path: str) -> str:
    """A PAL is a host file that root controls: absolute, a regular file (not through a symlink), owned by
    root and not writable by others, and an ELF shared object. Loading it runs its code."""
    import stat

    if not path:
        raise EnclaveConfigError("enclave runtime path (ENCLAVE_RUNTIME_PATH / enclave.runtime.path) is not set")
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise EnclaveConfigError(f"enclave runtime path {path!r} must be an absolute, normalised host path")
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise EnclaveConfigError(f"enclave runtime {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EnclaveConfigError(f"enclave runtime {path} is not a regular file")
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise EnclaveConfigError(f"enclave runtime {path} must be owned by root and not writable by group/others")
    parent = os.path.dirname(path)
    pst = os.stat(parent)
    if pst.st_uid != 0 or pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
        raise EnclaveConfigError(f"enclave runtime {path}: its directory {parent} is writable by others")
    with open(path, "rb") as f:
        header = f.read(18)
    if header[:4] != b"\x7fELF" or int.from_bytes(header[16:18], "little") != 3:  # ET_DYN
        raise EnclaveConfigError(f"enclave runtime {path} is not an ELF shared object")
    return path
