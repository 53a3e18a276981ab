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
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common import interleave, machine_description, print_ratio_table, run_command_ms

from clave.tools.bundles import make_bundle


@dataclass
class Runtime:
    name: str
    binary: str
    root: Path
    stderr: IO[str]
    container_id: str

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def call(self, *args: str) -> float:
        return run_command_ms(self.argv(*args), self.stderr, what=f"{self.name} {' '.join(args)}")

    def stop(self) -> None:
        subprocess.run(self.argv("delete", "--force", self.container_id), capture_output=True)


def find_runtimes(names: list[str], base: Path) -> list[Runtime]:
    found = []
    for name in names:
        binary = str(Path(sys.executable).parent / "clave") if name == "clave" else shutil.which(name)
        if binary is None or not os.access(binary, os.X_OK):
            print(f"note: {name} not installed, skipped")
            continue
        root = base / "state" / name
        root.mkdir(parents=True)
        found.append(Runtime(name, binary, root, open(base / f"{name}.stderr", "w+"), f"exec-bench-{name}"))
    return found


def start_containers(runtimes: list[Runtime], bundle: Path) -> list[Runtime]:
    """`run -d` the bundle under every runtime; those that cannot run it are reported and left out."""
    running = []
    for runtime in runtimes:
        try:
            runtime.call("run", "--detach", "--bundle", str(bundle), runtime.container_id)
        except RuntimeError as error:
            if runtime.name in ("clave", "runc"):
                raise
            print(f"note: {runtime.name} skipped, it cannot run this config here: {error}")
            continue
        running.append(runtime)
    return running


def measure_exec(runtime: Runtime) -> Callable[[], float]:
    return lambda: runtime.call("exec", runtime.container_id, "/bin/true")


def precompile_clave() -> None:
    """Write clave's bytecode first, as `pip install` does (PYTHONDONTWRITEBYTECODE is set on these machines)."""
    import clave

    package_dir = os.path.dirname(clave.__file__)
    subprocess.run([sys.executable, "-m", "compileall", "-q", package_dir], check=True, stdout=subprocess.DEVNULL)


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
            runtime.stop()
            runtime.stderr.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
