"""Warm start of enclave containers through containerd and `containerd-shim-clave-v2`, against a native
container of the same rootfs: `ctr run --rm --runtime io.containerd.clave.v2`, interleaved.

Variants: native (`/bin/true`), a WebAssembly enclave (a signed WASI module that exits at once, enclave.type=wasm,
after a warm-up that fills the precompiled-module cache) and a PAL enclave (the skeleton PAL, enclave.type=software,
running `/bin/true`). The anchor in Inclavare's enclave pool manager is 22 ms for a pooled SGX enclave.

    .venv/bin/python bench/bench_enclave.py [--runs 20] [--warmup 2]

Needs root, containerd and ctr (Debian package containerd), busybox-static, gcc, wasmtime.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from functools import partial
from pathlib import Path

from bench_shim import Containerd
from common import interleave, machine_description, print_ratio_table, run_command_ms

from clave.tools.bundles import make_busybox_rootfs

REPO = Path(__file__).resolve().parents[1]
RUNTIME = "io.containerd.clave.v2"


def wasm_module(rootfs: Path, key: Path) -> None:
    import wasmtime

    from clave.enclave.wasm import signing

    module = rootfs / "app" / "exit.wasm"
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "_start")))'))
    signing.generate_key(str(key))
    signing.sign_module(str(module), str(key), None)


def skeleton_pal(directory: Path) -> Path:
    pal = directory / "liberpal-skeleton.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-DPAL_API_VERSION=2", "-o", str(pal),
                    str(REPO / "tests" / "enclave" / "skeleton_pal.c")], check=True)
    return pal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_enclave.py needs root (containerd)")
    with tempfile.TemporaryDirectory(prefix="bencl-", dir="/run") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        rootfs = Path(make_busybox_rootfs(str(base / "rootfs")))
        wasm_module(rootfs, base / "signer.pem")
        pal = skeleton_pal(base)
        containerd = Containerd(base)
        stderr = tempfile.TemporaryFile("w+")

        def run_once(annotations: list[str], command: list[str]) -> float:
            flags = [a for pair in (("--annotation", x) for x in annotations) for a in pair]
            argv = containerd.argv("run", "--rm", "--runtime", RUNTIME, *flags, "--rootfs", str(rootfs),
                                   f"b-{uuid.uuid4().hex[:8]}", *command)
            return run_command_ms(argv, stderr, what=" ".join(argv[4:]))

        variants = {
            "native": partial(run_once, [], ["/bin/true"]),
            "wasm": partial(run_once, ["enclave.type=wasm"], ["/app/exit.wasm"]),
            "pal": partial(run_once, ["enclave.type=software", f"enclave.runtime.path={pal}",
                                      "enclave.runtime.args=log=/dev/null"], ["/bin/true"]),
        }
        try:
            print(machine_description())
            samples = interleave(variants, args.runs, args.warmup)
            print_ratio_table(f"ctr run --rm through containerd-shim-clave-v2, {args.runs} interleaved runs",
                              samples, baseline="native")
        finally:
            containerd.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
