"""Instructions the runtime process executes per verb, counted by valgrind (callgrind): stable on a shared,
loaded machine where wall-clock times drift, so it attributes time where medians cannot.

Counts user-space instructions of the `clave` process itself (not of the container's init, nor the kernel's
work: cgroup migrations, mounts, namespace teardown), for `python3 -IS -c pass` (the floor every verb pays),
`state`, `start`, `delete`, and `create` up to the fork of the container, with and without Docker's seccomp
profile (valgrind 3.19 has no openat2, so a container cannot be built under it: the count of the first forked
process, when it stops, is the runtime's work up to the fork plus a few hundred thousand of its own); with
``--old REV`` the same for another commit (a git worktree under /run, run through a launcher of the old
layout), to show what a change removed.

    .venv/bin/python bench/bench_icount.py [--old REV]

Needs root, valgrind and busybox-static.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_runtime import precompile_clave, write_bundles


def instructions(argv: list[str], forked: bool = False) -> int:
    """Instructions of the process started by ``argv`` (the largest count: its forks report their own), or
    with ``forked`` those of the container's intermediate, counted when it ended: the runtime's last fork
    (its first may be the grace period helper, clave.linux.cgroups.start_migration_grace_period).
    valgrind reports to files: a created container's init keeps the runtime's stdio open until it is started."""
    with tempfile.TemporaryDirectory(dir="/run") as logs:
        result = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                                 f"--log-file={logs}/%p", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # pid -> (parent pid, count); the container's init logs as pid 1 (its own pid namespace): left out.
        procs = {}
        for name in os.listdir(logs):
            text = Path(logs, name).read_text()
            parent, count = re.search(r"Parent PID: (\d+)", text), re.search(r"I\s+refs:\s+([\d,]+)", text)
            if name != "1" and parent and count:
                procs[int(name)] = (int(parent.group(1)), int(count.group(1).replace(",", "")))
    runtime = min(procs, default=0)
    children = [pid for pid, (parent, _) in procs.items() if parent == runtime]
    if (result.returncode != 0 and not forked) or not procs or (forked and not children):
        raise RuntimeError(f"{' '.join(argv)} failed (exit {result.returncode})")
    return procs[max(children)][1] if forked else max(count for _, count in procs.values())


def old_launcher(base: Path, rev: str) -> str:
    """A worktree of ``rev`` and a launcher running it (python -IS, its src first)."""
    tree = base / "old"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), rev], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "src" / "clave")], check=True,
                   stdout=subprocess.DEVNULL)
    import sysconfig

    launcher = base / "clave-old"
    launcher.write_text(f"#!{sys.executable} -IS\nimport sys\n"
                        f"sys.path[0:0] = [{str(tree / 'src')!r}, {sysconfig.get_paths()['purelib']!r}]\n"
                        "from clave.cli.main import main\nmain()\n")
    launcher.chmod(0o755)
    return str(launcher)


def measure(clave: str, root: Path, bundles: dict[str, Path]) -> dict[str, int]:
    plain, seccomp = str(bundles["without seccomp"]), str(bundles["with seccomp"])
    sleeper = root.parent / f"{root.name}-sleep"
    shutil.copytree(bundles["without seccomp"], sleeper, symlinks=True)
    config = json.loads((sleeper / "config.json").read_text())
    config["process"]["args"] = ["/bin/sleep", "1000"]
    (sleeper / "config.json").write_text(json.dumps(config))

    def cli(*args: str) -> None:
        subprocess.run([clave, "--root", str(root), *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    out = {}
    try:
        cli("create", "--bundle", str(sleeper), "s")
        out["state"] = instructions([clave, "--root", str(root), "state", "s"])
        cli("create", "--bundle", plain, "c")
        out["start"] = instructions([clave, "--root", str(root), "start", "c"])
        out["delete"] = instructions([clave, "--root", str(root), "delete", "--force", "c"])
        out["create up to the fork, without seccomp"] = instructions(
            [clave, "--root", str(root), "create", "--bundle", plain, "c2"], forked=True)
        out["create up to the fork, with seccomp"] = instructions(
            [clave, "--root", str(root), "create", "--bundle", seccomp, "c3"], forked=True)
    finally:
        for cid in ("s", "c", "c2", "c3"):
            subprocess.run([clave, "--root", str(root), "delete", "--force", cid], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="another commit to count too")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("valgrind"):
        sys.exit("bench_icount: needs root and valgrind")
    base = Path(tempfile.mkdtemp(prefix="clave-icount-", dir="/run"))
    try:
        bundles = write_bundles(base)
        precompile_clave()
        floor = instructions([sys.executable, "-IS", "-c", "pass"])
        variants = {"new": str(Path(sys.executable).parent / "clave")}
        if args.old:
            variants = {"old": old_launcher(base, args.old), **variants}
        counts = {name: measure(clave, base / f"root-{name}", bundles) for name, clave in variants.items()}
        print(f"instructions of the runtime process (millions); `python3 -IS -c pass`: {floor / 1e6:.1f}")
        header = "| verb | " + " | ".join(counts) + " | beyond the bare interpreter (" + ", ".join(counts) + ") |"
        print(header)
        print("|" + "---|" * (len(counts) + 2))
        for verb in counts["new"]:
            cells = [f"{c[verb] / 1e6:.1f}" for c in counts.values()]
            beyond = [f"{(c[verb] - floor) / 1e6:.1f}" for c in counts.values()]
            print(f"| {verb} | " + " | ".join(cells) + " | " + ", ".join(beyond) + " |")
    finally:
        if args.old:
            subprocess.run(["git", "worktree", "remove", "--force", str(base / "old")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
