"""podman (with conmon) drives clave as its OCI runtime (`--runtime clave`): run, exec, pause/unpause,
update --memory, stop and rm on a busybox image imported locally (no registry). podman runs with private
storage (vfs), run and tmp dirs, cgroupfs and no network, so it touches nothing of the host's podman.

Debian packages: podman, conmon (catatonit, uidmap, fuse-overlayfs, slirp4netns come with them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLAVE = Path(sys.executable).with_name("clave")
IMAGE = "localhost/busybox-clave:latest"
# A container that stops at once on SIGTERM (as pid 1, `sleep` alone would ignore it until podman's SIGKILL).
SERVICE = ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]


@dataclass
class Podman:
    base: Path

    def __call__(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [
            "podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
            "--tmpdir", str(self.base / "tmp"), "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--runtime", str(CLAVE), *args,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def status(self, name: str) -> str:
        return self("inspect", "--format", "{{.State.Status}}", name).stdout.strip()


# podman asks for RLIMIT_NOFILE and RLIMIT_NPROC of 1048576 as root; without CAP_SYS_RESOURCE (these hosts) no
# runtime can raise a hard limit, and conmon runs the runtime with lower ones. Ask for limits any host allows.
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if os.geteuid() != 0:
        pytest.skip("podman with a private root needs root")
    for tool, package in (("podman", "podman"), ("conmon", "conmon")):
        if shutil.which(tool) is None and not Path(f"/usr/libexec/podman/{tool}").exists():
            pytest.skip(f"{tool} is not installed (Debian package {package})")
    if not CLAVE.exists():
        pytest.skip(f"{CLAVE} not found")
    from clave.tools.bundles import BUSYBOX, make_busybox_rootfs

    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not found: install Debian's busybox-static")
    base = tmp_path_factory.mktemp("podman")
    rootfs = make_busybox_rootfs(str(base / "rootfs"))
    with tarfile.open(base / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    instance = Podman(base)
    instance("import", str(base / "rootfs.tar"), IMAGE)
    try:
        yield instance
    finally:
        instance("rm", "--all", "--force", "--time", "0", check=False)
        instance("rmi", "--all", "--force", check=False)


def test_run_prints_output_and_returns_exit_status(podman: Podman) -> None:
    result = podman("run", "--rm", "--network", "none", *ULIMITS, IMAGE, "sh", "-c",
                    "echo hello from clave; cat /proc/1/comm; exit 3", check=False)
    assert result.stdout == "hello from clave\nsh\n", result.stderr
    assert result.returncode == 3


def test_exec_pause_update_stop_rm(podman: Podman) -> None:
    name = f"clave-{uuid.uuid4().hex[:6]}"
    container_id = podman("run", "-d", "--name", name, "--network", "none", *ULIMITS, IMAGE,
                          *SERVICE).stdout.strip()
    try:
        assert podman.status(name) == "running"
        result = podman("exec", name, "sh", "-c", "echo in-exec $(cat /proc/1/comm); exit 4", check=False)
        assert (result.returncode, result.stdout) == (4, "in-exec sh\n"), result.stderr

        podman("pause", name)
        assert podman.status(name) == "paused"
        # podman keeps no --root for the runtime: clave's own view comes from its default root.
        state = subprocess.run([str(CLAVE), "state", container_id], capture_output=True, text=True, check=True)
        assert json.loads(state.stdout)["status"] == "paused"
        podman("unpause", name)
        assert podman.status(name) == "running"
        assert podman("exec", name, "echo", "thawed").stdout == "thawed\n"

        podman("update", "--memory", "64m", name)
        limit = podman("exec", name, "sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null"
                       " || cat /sys/fs/cgroup/memory.max").stdout.strip()
        assert limit == str(64 * 1024 * 1024)

        started = time.monotonic()
        podman("stop", name)
        assert time.monotonic() - started < 5, "the container should stop on SIGTERM, not wait for SIGKILL"
        assert podman.status(name) == "exited"
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        podman("rm", "--force", "--time", "0", name)
    assert podman("ps", "--all", "--quiet", "--no-trunc").stdout.split().count(container_id) == 0
    listing = subprocess.run([str(CLAVE), "list", "--quiet"], capture_output=True, text=True).stdout.split()
    assert container_id not in listing, "clave still has state for the removed container"
    cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/libpod_parent/libpod-{container_id}")]
    cgroups += list(Path("/sys/fs/cgroup").glob(f"libpod_parent/libpod-{container_id}"))
    assert cgroups == [], cgroups
