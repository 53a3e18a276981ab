"""`exec` latency: `clave exec` against `runc exec` (and `crun exec` when it can run the bundle) into a running
container, interleaved (clave, runc, crun, clave, ...).

Each runtime runs the same bundle (`clave spec`'s defaults with Docker's seccomp profile, `sleep 600`, root not
read-only) detached; then `RUNTIME --root R exec ID /bin/true` is timed from fork to exit: join the
container's namespaces and cgroup, apply its capabilities, seccomp and user, run the process, wait for it.
State roots and bundles live under /run (tmpfs). Needs root.

    .venv/bin/python bench/bench_exec.py [--runs N] [--warmup N] [--runtimes clave,runc,crun]

Prints medians, p90 and min in milliseconds and the ratio of each median to runc's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_runtime import Runtime, find_runtimes, precompile_clave
from common import interleave, machine_description, print_ratio_table

from clave.tools.bundles import make_bundle


def container_id(runtime: Runtime) -> str:
    return f"exec-bench-{runtime.name}"


def start_containers(runtimes: list[Runtime], bundle: Path) -> list[Runtime]:
    """`run -d` the bundle under every runtime; those that cannot run it are reported and left out."""
    running = []
    for runtime in runtimes:
        try:
            runtime.call("run", "--detach", "--bundle", str(bundle), container_id(runtime))
        except RuntimeError as error:
            if runtime.name in ("clave", "runc"):
                raise
            print(f"note: {runtime.name} skipped, it cannot run this config here: {error}")
            continue
        running.append(runtime)
    return running


def measure_exec(runtime: Runtime) -> Callable[[], float]:
    return lambda: runtime.call("exec", container_id(runtime), "/bin/true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="measured execs per runtime (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--runtimes", default="clave,runc,crun", help="comma-separated, in interleaving order")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_exec: needs root (containers with namespaces and cgroups)")

    base = Path(tempfile.mkdtemp(prefix="clave-bench-exec-", dir="/run"))
    runtimes: list[Runtime] = []
    try:
        runtimes = find_runtimes(args.runtimes.split(","), base)
        if not any(r.name == "runc" for r in runtimes):
            sys.exit("bench_exec: runc is the baseline and is not installed")
        make_bundle(str(base / "bundle"), ["sleep", "600"])
        precompile_clave()
        running = start_containers(runtimes, base / "bundle")
        print(f"machine: {machine_description()}")
        samples = interleave({r.name: measure_exec(r) for r in running}, args.runs, args.warmup)
        print_ratio_table(f"exec /bin/true into a running container ({args.runs} runs each, interleaved)",
                          samples, baseline="runc", label="runtime")
    finally:
        for runtime in runtimes:
            runtime.force_delete_all()
            runtime.stderr.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
