"""Cost of seccomp on the container start path: compile + load of the default (Docker-like) profile in a
forked child, load alone of a precompiled program, `apply()` when the parent compiled before forking (the
cache is inherited), and the import time of clave.linux.seccomp.

    .venv/bin/python bench/bench_seccomp.py [--runs N]

Prints medians (and p90) in milliseconds. Run as root or not: the child sets no_new_privs first.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from clave.linux import seccomp
from clave.linux.capabilities import set_no_new_privs
from clave.linux.seccomp_default import DEFAULT_PROFILE


def _in_child(measure: str, program: bytes) -> float:
    """Fork, measure one step in the child, report seconds through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            set_no_new_privs()
            start = time.perf_counter()
            if measure == "compile+load":
                seccomp.load_filter(seccomp.compile_filter(DEFAULT_PROFILE))
            elif measure == "compile":
                seccomp.compile_filter(DEFAULT_PROFILE)
            elif measure == "apply, parent compiled":
                seccomp.apply(DEFAULT_PROFILE)
            else:
                seccomp.load_filter(program)
            os.write(write_end, repr(time.perf_counter() - start).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(pid, 0)
    return float(data)


def _import_time_us() -> int:
    """Cumulative microseconds for `import clave.linux.seccomp` in a fresh interpreter (-X importtime)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import clave.linux.seccomp"],
        capture_output=True, text=True, check=True,
    )
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| clave\.linux\.seccomp$", line)
        if match:
            return int(match.group(1))
    raise RuntimeError("no import time line for clave.linux.seccomp")


def _summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"{name:<34} median {statistics.median(ordered):7.3f} ms   p90 {p90:7.3f} ms   (n={len(ordered)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    program = seccomp.compile_filter(DEFAULT_PROFILE)
    print(f"default profile: {len(DEFAULT_PROFILE['syscalls'][0]['names'])} allowed syscalls, "
          f"architectures {DEFAULT_PROFILE['architectures']}, {len(program) // 8} BPF instructions")
    seccomp.compile_cached(DEFAULT_PROFILE)  # what the runtime does before forking the container's init
    for measure in ("compile", "load", "compile+load", "apply, parent compiled"):
        samples = [_in_child(measure, program) * 1000 for _ in range(args.runs)]
        print(_summary(measure + " (child)", samples))
    imports = [_import_time_us() / 1000 for _ in range(max(5, args.runs // 3))]
    print(_summary("import clave.linux.seccomp", imports))
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set, so imports compile from source (no .pyc)")


if __name__ == "__main__":
    main()
