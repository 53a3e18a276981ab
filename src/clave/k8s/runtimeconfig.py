"""The per-handler runtime config file: which Clave handler a containerd runtime name stands for.

containerd hands a shim that is not runc its runtime's ``options`` as ``runtimeoptions.v1.Options{type_url,
config_path, config_body}``; `clave node install` points ``ConfigPath`` of each runtime (``clave``,
``clave-enclave``, ``clave-vm``) at one of these files, which containerd-shim-clave-v2 is to read at Create.
The format (TOML, one file per runtime name):

    # comments
    version = 1                 # this format's version; other versions are refused
    runtime = "clave-enclave"   # the containerd runtime name (CRI handler) the file was written for
    handler = "enclave"         # native | enclave | vm
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

from clave.errors import InvalidArgument

VERSION = 1
HANDLERS = ("native", "enclave", "vm")


class RuntimeConfigError(InvalidArgument):
    pass


@dataclass(frozen=True)
class RuntimeConfig:
    runtime: str
    handler: str


def render(config: RuntimeConfig) -> str:
    if config.handler not in HANDLERS:
        raise RuntimeConfigError(f"unknown handler {config.handler!r}: use one of {', '.join(HANDLERS)}")
    return (f"# Clave runtime {config.runtime!r}, written by `clave node install`: containerd passes this file's\n"
            "# path to containerd-shim-clave-v2 as its runtime options (ConfigPath).\n"
            f"version = {VERSION}\n"
            f'runtime = "{config.runtime}"\n'
            f'handler = "{config.handler}"\n')


def parse(text: str, where: str) -> RuntimeConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuntimeConfigError(f"{where}: not valid TOML: {exc}") from None
    if data.get("version") != VERSION:
        raise RuntimeConfigError(f"{where}: version must be {VERSION}, not {data.get('version')!r}")
    unknown = sorted(set(data) - {"version", "runtime", "handler"})
    if unknown:
        raise RuntimeConfigError(f"{where}: unknown key {unknown[0]!r}")
    handler, runtime = data.get("handler"), data.get("runtime", "")
    if handler not in HANDLERS:
        raise RuntimeConfigError(f"{where}: handler must be one of {', '.join(HANDLERS)}, not {handler!r}")
    if not isinstance(runtime, str):
        raise RuntimeConfigError(f"{where}: runtime must be a string")
    return RuntimeConfig(runtime, handler)


def load(path: str) -> RuntimeConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise RuntimeConfigError(f"cannot read runtime config {path}: {exc.strerror}") from None
    return parse(text, path)
