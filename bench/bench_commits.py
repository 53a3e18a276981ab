"""Two commits of Clave against each other: has a change made the hot paths slower?

The older commit is checked out into a git worktree under /run and run through launchers of its own (the same
interpreter and site-packages, its own ``src``), the current tree through the venv's console scripts, all
interleaved (old, new, old, new, ...):

1. `clave run /bin/true` with `clave spec`'s defaults (Docker's seccomp profile);
2. the call sequence containerd's runc.v2 shim drives (create, start, state, wait, delete), each step timed;
3. `ctr run --rm` through the clave shim: the old commit's shim is registered as the runtime
   io.containerd.claveold.v2 (containerd finds `containerd-shim-claveold-v2` on its PATH).

    .venv/bin/python bench/bench_commits.py --old REV [--runs 20] [--warmup 2]

Prints medians and the new/old ratio. Needs root, containerd and busybox-static.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from pathlib import Path

from bench_runtime import (
    PR_SET_CHILD_SUBREAPER,
    SHIM_STEPS,
    Counter,
    Runtime,
    measure_run,
    measure_shim_sequence,
    precompile_clave,
    write_bundles,
)
from bench_shim import Containerd
from common import interleave, machine_description, print_ratio_table, run_command_ms, steps_table

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"clave": "clave.cli.main", "containerd-shim-claveold-v2": "clave.shim.main"}


def old_checkout(rev: str, base: Path) -> Path:
    """A worktree of ``rev`` with launchers in ``base/bin`` (python -IS, its src first on the path)."""
    tree = base / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "src")], check=True,
                   stdout=subprocess.DEVNULL)
    paths = [str(tree / "src"), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for name, module in SCRIPTS.items():
        script = bin_dir / name
        script.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path[0:0] = {paths!r}\n"
                          f"from {module} import main\nmain()\n")
        script.chmod(0o755)
    return bin_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the commit to compare with (the current tree is 'new')")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_commits: needs root")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    base = Path(tempfile.mkdtemp(prefix="clave-bench-commits-", dir="/run"))
    runtimes: list[Runtime] = []
    containerd = None
    try:
        old_bin = old_checkout(args.old, base)
        precompile_clave()
        new_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
        print(f"machine: {machine_description()}")
        print(f"old: {args.old} (worktree {base / 'old'}); new: the working tree at {new_rev}")
        for name, binary in (("old", str(old_bin / "clave")), ("new", str(Path(sys.executable).parent / "clave"))):
            root = base / "state" / name
            root.mkdir(parents=True)
            runtimes.append(Runtime(name, binary, root, open(base / f"{name}.stderr", "w+")))
        bundle = write_bundles(base)["with seccomp"]
        ids = Counter()
        runs = interleave({r.name: measure_run(r, bundle, ids) for r in runtimes}, args.runs, args.warmup)
        print_ratio_table("`clave run /bin/true` (Docker's seccomp profile)", runs, "old", label="commit")
        sequences = interleave({r.name: measure_shim_sequence(r, bundle, ids) for r in runtimes},
                               args.runs, args.warmup)
        steps = {step: {name: [t[step] for t in samples] for name, samples in sequences.items()}
                 for step in (*SHIM_STEPS, "total")}
        print("\nrunc.v2-shim call sequence")
        print(steps_table(steps, "old"))

        os.environ["PATH"] = f"{old_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"  # containerd inherits it
        (base / "containerd").mkdir()
        containerd = Containerd(base / "containerd")
        rootfs = base / "rootfs"
        stderr = tempfile.TemporaryFile("w+")

        def ctr_run(runtime: str) -> float:
            cid = f"cmp-{uuid.uuid4().hex[:8]}"
            return run_command_ms(containerd.argv("run", "--rm", "--runtime", runtime, "--rootfs", str(rootfs),
                                                  cid, "/bin/true"), stderr, what=f"ctr run --rm {runtime}")

        latency = interleave({"old": lambda: ctr_run("io.containerd.claveold.v2"),
                              "new": lambda: ctr_run("io.containerd.clave.v2")}, args.runs, args.warmup)
        print_ratio_table("\n`ctr run --rm /bin/true` through the clave shim", latency, "old", label="commit")
    finally:
        if containerd is not None:
            containerd.close()
        for runtime in runtimes:
            runtime.force_delete_all()
            runtime.stderr.close()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base / "old")],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
