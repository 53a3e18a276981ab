"""podman with clave against podman with runc: `podman run --rm --runtime R busybox true`, interleaved.

podman runs with private storage (vfs), run and tmp dirs, cgroupfs, file events and no network, so it touches
nothing of the host's podman; the busybox image is built from Debian's busybox-static and imported locally.
podman asks for rlimits (1048576) above these hosts' hard limits and no runtime can raise a hard limit
without CAP_SYS_RESOURCE, so every run passes --ulimit nofile/nproc of 1024, for both runtimes alike.

    .venv/bin/python bench/bench_podman.py [--runs 20] [--warmup 1]

Needs root, Debian's podman and conmon, runc and busybox-static.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from common import interleave, machine_description, print_ratio_table, run_command_ms

from clave.tools.bundles import make_busybox_rootfs

IMAGE = "localhost/busybox-clave:latest"
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def podman_argv(base: Path, *args: str) -> list[str]:
    return ["podman", "--root", str(base / "root"), "--runroot", str(base / "run"), "--tmpdir", str(base / "tmp"),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]


def measure(base: Path, runtimes: dict[str, str], runs: int, warmup: int) -> dict[str, list[float]]:
    stderr = tempfile.TemporaryFile("w+")

    def run_once(name: str) -> float:
        argv = podman_argv(base, "--runtime", runtimes[name], "run", "--rm", "--name", f"bench-{uuid.uuid4().hex[:8]}",
                           "--network", "none", *ULIMITS, IMAGE, "true")
        return run_command_ms(argv, stderr, what=f"podman run --rm --runtime {name}")

    variants: dict[str, Callable[[], float]] = {name: partial(run_once, name) for name in runtimes}
    return interleave(variants, runs, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_podman.py needs root (podman with a private root)")
    runc = shutil.which("runc")
    for tool, path in (("podman", shutil.which("podman")), ("runc", runc)):
        if path is None:
            raise SystemExit(f"{tool} not found: install Debian's {tool}")
    assert runc is not None
    runtimes = {"clave": str(Path(sys.executable).with_name("clave")), "runc": runc}
    with tempfile.TemporaryDirectory(prefix="bpod-", dir="/run") as tmp:
        base = Path(tmp)
        rootfs = make_busybox_rootfs(str(base / "rootfs"))
        with tarfile.open(base / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        subprocess.run(podman_argv(base, "import", str(base / "rootfs.tar"), IMAGE), check=True,
                       capture_output=True)
        try:
            print(machine_description())
            samples = measure(base, runtimes, args.runs, args.warmup)
            print_ratio_table(f"podman run --rm {IMAGE} true, {args.runs} interleaved runs", samples,
                              baseline="runc", label="runtime")
        finally:
            subprocess.run(podman_argv(base, "rm", "--all", "--force", "--time", "0"), capture_output=True)
            subprocess.run(podman_argv(base, "rmi", "--all", "--force"), capture_output=True)


if __name__ == "__main__":
    main()
