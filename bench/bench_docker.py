"""Docker with clave against Docker with runc: `docker run --rm busybox true`, the two runtimes interleaved.

A private dockerd (its own --data-root, --exec-root, socket, pid file and cgroup parent; vfs storage, no
iptables or bridge) on a private containerd (bench_shim's), with clave configured as a runtime in its
daemon.json and a busybox image built from Debian's busybox-static and loaded with `docker load`.

    .venv/bin/python bench/bench_docker.py [--runs 20] [--warmup 1]

Needs root, Debian's docker.io (/usr/bin/docker, /usr/sbin/dockerd), containerd, runc and busybox-static.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench_shim import Containerd, remove_namespace_dirs
from common import interleave, machine_description, print_ratio_table, run_command_ms

from clave.tools.bundles import make_busybox_rootfs, write_image_archive

DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker may be another program on these machines
DOCKERD = "/usr/sbin/dockerd"
IMAGE = "busybox-clave:latest"
CLAVE = str(Path(sys.executable).with_name("clave"))


class Dockerd:
    """A private dockerd on ``containerd``'s socket and namespace; cgroups under /<namespace>."""

    def __init__(self, base: Path, containerd: Containerd) -> None:
        self.base = base
        self.socket = base / "docker.sock"
        config = base / "daemon.json"
        config.write_text(json.dumps({"runtimes": {"clave": {"path": CLAVE}}}))
        self.run_docker_existed = os.path.exists("/run/docker")  # dockerd always makes /run/docker/plugins
        self.log = open(base / "dockerd.log", "wb")
        self.process = subprocess.Popen(
            [DOCKERD, "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
             "-H", f"unix://{self.socket}", "--pidfile", str(base / "docker.pid"), "--iptables=false",
             "--ip6tables=false", "--bridge=none", "--storage-driver", "vfs", "--config-file", str(config),
             "--containerd", containerd.address, "--containerd-namespace", containerd.namespace,
             "--containerd-plugins-namespace", containerd.namespace + "-plugins",
             "--cgroup-parent", "/" + containerd.namespace],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists() or self.docker("version").returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start; see {base / 'dockerd.log'}")
            time.sleep(0.2)

    def argv(self, *args: str) -> list[str]:
        return [DOCKER, "-H", f"unix://{self.socket}", *args]

    def docker(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
        return result

    def close(self) -> None:
        try:
            for cid in self.docker("ps", "--all", "--quiet").stdout.split():
                self.docker("rm", "--force", cid)
        finally:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
            self.log.close()
            if not self.run_docker_existed:
                shutil.rmtree("/run/docker", ignore_errors=True)


def measure(dockerd: Dockerd, runs: int, warmup: int) -> dict[str, list[float]]:
    stderr = tempfile.TemporaryFile("w+")

    def run_once(runtime: str) -> float:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        return run_command_ms(dockerd.argv("run", "--rm", "--name", name, "--runtime", runtime, IMAGE, "true"),
                              stderr, what=f"docker run --rm --runtime {runtime}")

    variants: dict[str, Callable[[], float]] = {name: partial(run_once, name) for name in ("clave", "runc")}
    return interleave(variants, runs, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_docker.py needs root (dockerd)")
    for tool, package in ((DOCKER, "docker.io"), (DOCKERD, "docker.io"), ("containerd", "containerd"),
                          ("runc", "runc")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install Debian's {package}")
    with tempfile.TemporaryDirectory(prefix="bdock-", dir="/run") as tmp:
        base = Path(tmp)
        rootfs = make_busybox_rootfs(str(base / "rootfs"))
        archive = write_image_archive(rootfs, str(base / "busybox.tar"), IMAGE)
        containerd = Containerd(base)
        try:
            dockerd = Dockerd(base, containerd)
            try:
                dockerd.docker("load", "--input", archive, check=True)
                print(machine_description())
                samples = measure(dockerd, args.runs, args.warmup)
                print_ratio_table(f"docker run --rm {IMAGE} true, {args.runs} interleaved runs", samples,
                                  baseline="runc", label="runtime")
            finally:
                dockerd.close()
        finally:
            containerd.close()
            remove_namespace_dirs(containerd.namespace + "-plugins")


if __name__ == "__main__":
    main()
