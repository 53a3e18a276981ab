"""enclave: sign and measure WebAssembly enclave modules (the built-in ``wasm`` enclave type).

usage: clave enclave keygen --out KEY.pem
       clave enclave sign --key KEY.pem [--config config.json] MODULE.wasm|BUNDLE
       clave enclave measure [--config config.json] MODULE.wasm|BUNDLE
       clave enclave compile [python|javascript|MODULE.wasm]...

keygen writes a new Ed25519 signing key (mode 0600). sign writes MODULE.wasm.sig beside the module, signing its
measurement under the enclave config taken from an OCI config.json (memory limit, RLIMIT_CPU; default:
unlimited). measure prints {"mrenclave", "mrsigner", "enclave_config"} as JSON: what a verifier should expect.
Without --config it uses the config in MODULE.wasm.sig when the module is signed; mrsigner is null when the
module is not signed.

Given a BUNDLE (a directory with config.json) whose process runs an interpreter (python3 app.py, node app.js),
sign and measure work on the app: its language runtime, its image's files and its arguments (see
clave.enclave.wasm.measure); sign writes the signature into the image as /.clave/enclave.sig, and measure also
prints the manifest. compile puts a language runtime (default: both) or a module into this host's compiled-module
cache ahead of the first container, showing progress.
"""

from __future__ import annotations

import os

from clave import fastjson
from clave.cli.main import Parsed, UsageError, parse_flags
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "out": ("str", ("o",)), "key": ("str", ("k",)), "config": ("str", ("c",)), "help": ("bool", ("h",)),
}
SUBCOMMANDS = ("keygen", "sign", "measure", "compile")


def run(parsed: Parsed, ctx: Any) -> int:
    if not parsed.args or parsed.args[0] not in SUBCOMMANDS:
        raise UsageError(f"usage: clave enclave {{{'|'.join(SUBCOMMANDS)}}} ...; see 'clave enclave --help'")
    command = parsed.args[0]
    sub = parse_flags(parsed.args[1:], FLAGS, f"enclave {command}")
    flags = {**parsed.flags, **sub.flags}
    if command == "keygen":
        return _keygen(flags)
    if command == "compile":
        return _compile(sub.args or ["python", "javascript"])
    if len(sub.args) != 1:
        raise UsageError(f"usage: clave enclave {command} {'--key KEY.pem ' if command == 'sign' else ''}"
                         "[--config config.json] MODULE.wasm")
    if os.path.isdir(sub.args[0]):
        return _app(command, flags, sub.args[0])
    if command == "sign":
        from clave.enclave.wasm import signing

        module = sub.args[0]
        return _sign(flags, module, lambda key: signing.sign_module(module, key, _oci_config(flags)))
    return _measure(flags, sub.args[0])


def _keygen(flags: dict[str, Any]) -> int:
    from clave.enclave.wasm import signing

    out = flags.get("out")
    if not out:
        raise UsageError("usage: clave enclave keygen --out KEY.pem")
    try:
        mrsigner = signing.generate_key(out)
    except FileExistsError:
        raise ClaveError(f"{out} exists: refusing to overwrite a key") from None
    except OSError as exc:
        raise ClaveError(f"cannot write {out}: {exc.strerror}") from None
    print(fastjson.dumps({"key": out, "mrsigner": mrsigner.hex()}))
    return 0


def _oci_config(flags: dict[str, Any]) -> dict[str, int | None] | None:
    from clave.enclave.wasm import measure

    path = flags.get("config")
    if not path:
        return None
    from clave.config import spec

    try:
        return measure.enclave_config(spec.read_document(path))  # only its limits matter: a partial config will do
    except spec.ConfigError as exc:
        raise ClaveError(str(exc)) from None
    except (AttributeError, TypeError) as exc:
        raise ClaveError(f"{path} is not an OCI config: {exc}") from None


def _sign(flags: dict[str, Any], target: str, sign: Any) -> int:
    """Run ``sign(key_path)`` for a module or a bundle and print its result."""
    from clave.enclave.wasm import signing

    key = flags.get("key")
    if not key:
        raise UsageError(f"usage: clave enclave sign --key KEY.pem [--config config.json] {target}")
    try:
        result = sign(key)
    except signing.SignatureError as exc:
        raise ClaveError(str(exc)) from None
    except OSError as exc:
        raise ClaveError(f"cannot sign {target}: {exc.strerror}: {exc.filename}") from None
    print(fastjson.dumps(result))
    return 0


def _measure(flags: dict[str, Any], module: str) -> int:
    from clave.enclave.wasm import measure, signing

    try:
        with open(module, "rb") as f:
            wasm = f.read()
    except OSError as exc:
        raise ClaveError(f"cannot read {module}: {exc.strerror}") from None
    config = _oci_config(flags)
    mrsigner = None
    sig_path = signing.signature_path(module)
    if os.path.exists(sig_path):
        with open(sig_path, "rb") as f:
            document = f.read()
        try:
            signed = signing.verify(wasm, document, module)
        except signing.SignatureError as exc:
            raise ClaveError(str(exc)) from None
        mrsigner = signed.mrsigner.hex()
        if config is None:
            config = signed.enclave_config
    config = config or measure.enclave_config(None)
    mrenclave = measure.mrenclave(measure.module_digest(wasm), config)
    print(fastjson.dumps({"mrenclave": mrenclave.hex(), "mrsigner": mrsigner, "enclave_config": config}))
    return 0


def _compile(names: list[str]) -> int:
    import sys

    from clave.enclave.wasm import cache, compiler, interpreters

    by_name = {"python": interpreters.PYTHON, "javascript": interpreters.JAVASCRIPT}
    for name in names:
        try:
            path = by_name[name].module_path() if name in by_name else name
            if not compiler.ensure_compiled(path, announce=lambda line: print(f"clave: {line}", file=sys.stderr)):
                print(f"clave: {os.path.basename(path)} is already compiled for this host", file=sys.stderr)
        except (OSError, cache.CacheError) as exc:
            raise ClaveError(f"compile {name}: {exc}") from None
    return 0


def _app(command: str, flags: dict[str, Any], bundle: str) -> int:
    """sign or measure the app a bundle runs through a language runtime."""
    from clave.config import spec
    from clave.enclave.wasm import cache, interpreters, measure, signing

    try:
        oci = spec.load_bundle(bundle)
    except spec.ConfigError as exc:
        raise ClaveError(str(exc)) from None
    args = oci.get("process", {}).get("args", [])
    root = oci["root"]["path"]
    language = interpreters.for_command(args[0]) if args else None
    if language is None:
        raise ClaveError(f"{bundle}: process.args[0] ({args[0] if args else 'none'}) is not an interpreter of "
                         f"{interpreters.SUPPORTED}; sign or measure a WASI module by its path")
    rootfs = root if os.path.isabs(root) else os.path.join(bundle, root)
    try:
        store = cache.ModuleCache()
        store.open()
        runtime_sha256 = store.file_digest(language.module_path())
        document = None
        if command == "measure" and os.path.exists(signing.app_signature_path(rootfs)):
            with open(signing.app_signature_path(rootfs), "rb") as f:
                document = f.read()
        config = _oci_config(flags) or signing.signed_config(document) or measure.enclave_config(oci)
        env = language.code_env(oci["process"].get("env") or [])
        manifest = measure.bundle_manifest(language.name, env, runtime_sha256, rootfs, oci, config)
    except (OSError, cache.CacheError) as exc:
        raise ClaveError(f"cannot measure {bundle}: {exc}") from None
    if command == "sign":
        return _sign(flags, bundle, lambda key: signing.sign_app(rootfs, manifest, key))
    mrsigner = None
    if document is not None:
        try:
            mrsigner = signing.verify_app(manifest, document, bundle).mrsigner.hex()
        except signing.SignatureError as exc:
            raise ClaveError(str(exc)) from None
    print(fastjson.dumps({"mrenclave": measure.app_mrenclave(manifest).hex(), "mrsigner": mrsigner,
                      "enclave_config": manifest["enclave_config"], "manifest": manifest}))
    return 0
