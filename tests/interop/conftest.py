"""A real containerd for interop tests: private config, socket, root and state dirs, a unique namespace, and
teardown that leaves nothing behind (tasks, containers, shims, the runc root and cgroups of the namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import cgroup_dirs, process_argvs, stop_pid, wait_for  # noqa: F401  (the test modules import them from here)

# The runc.v2 shim keeps runtime state here whatever containerd's own state dir is.
SHIM_RUNC_ROOT = Path("/run/containerd/runc")


def clave_binary() -> Path:
    """The `clave` console script of the interpreter running the tests (works in any venv)."""
    return Path(sys.executable).parent / "clave"




def shim_pids(namespace: str, container_id: str | None = None) -> list[int]:
    """Pids of containerd-shim processes serving ``namespace`` (and ``container_id`` if given)."""
    found = []
    for pid, argv in process_argvs():
        # A Python shim runs as its interpreter: look at the script too.
        if not any(os.path.basename(a).startswith(b"containerd-shim") for a in argv[:3]):
            continue
        args = [a.decode(errors="replace") for a in argv]
        if not _flag_value(args, "-namespace") == namespace:
            continue
        if container_id is None or _flag_value(args, "-id") == container_id:
            found.append(pid)
    return found



def _flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None




@dataclass
class Containerd:
    address: str
    namespace: str
    state_dir: Path
    log_path: Path

    @property
    def runc_root(self) -> Path:
        """The --root the runc.v2 shim passes to the runtime for this namespace."""
        return SHIM_RUNC_ROOT / self.namespace

    def bundle_dir(self, container_id: str) -> Path:
        return self.state_dir / "io.containerd.runtime.v2.task" / self.namespace / container_id

    def ctr(self, *args: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address SOCK -n NS ARGS...` and capture its output."""
        command = ["ctr", "--address", self.address, "-n", self.namespace, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def task_ids(self) -> list[str]:
        return self.ctr("task", "ls", "-q", check=True).stdout.split()

    def container_ids(self) -> list[str]:
        return self.ctr("container", "ls", "-q", check=True).stdout.split()

    def cgroups(self, container_id: str) -> list[Path]:
        """The cgroup dirs of a container: ctr puts each one in /<namespace>/<id>."""
        return cgroup_dirs(f"{self.namespace}/{container_id}")

    def shims(self, container_id: str) -> list[int]:
        return shim_pids(self.namespace, container_id)

    def remove_everything(self) -> None:
        """Kill and delete every task, then delete every container, of our namespace."""
        for task in self.task_ids():
            self.ctr("task", "kill", "-s", "SIGKILL", task)
            self.ctr("task", "delete", "--force", task)
        for container in self.container_ids():
            self.ctr("container", "delete", container)


def _write_config(base: Path) -> Path:
    address = base / "containerd.sock"
    config = base / "config.toml"
    # CRI needs network and images; only the task/container services are wanted here.
    config.write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{base / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[ttrpc]\n"
        f'  address = "{address}.ttrpc"\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
    )
    return config


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A containerd of our own, answering on a private socket, with a namespace nobody else uses."""
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package containerd)")
    # Short path: unix socket addresses are limited to 108 bytes.
    base = Path(tmp_path_factory.mktemp("ctrd"))
    config = _write_config(base)
    log_path = base / "containerd.log"
    namespace = f"clave-test-{uuid.uuid4().hex[:8]}"
    with open(log_path, "wb") as log:
        # containerd finds shims (containerd-shim-clave-v2) on its PATH: put the test interpreter's bin first.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)
    instance = Containerd(str(base / "containerd.sock"), namespace, base / "state", log_path)
    try:
        _wait_until_answering(instance, daemon)
        yield instance
    finally:
        try:
            if daemon.poll() is None:
                instance.remove_everything()
        finally:
            stop_pid(daemon.pid)
            daemon.wait(timeout=10)
            # Shims outlive containerd: stop any that still serve our namespace.
            for pid in shim_pids(namespace):
                stop_pid(pid)
            for leftover in cgroup_dirs(namespace):
                _remove_cgroup_tree(leftover)
            shutil.rmtree(instance.runc_root, ignore_errors=True)
            shutil.rmtree(f"/run/containerd/clave/{namespace}", ignore_errors=True)  # the clave shim's engine root


def _wait_until_answering(instance: Containerd, daemon: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"containerd exited with {daemon.returncode}: {instance.log_path.read_text()[-2000:]}")
        if os.path.exists(instance.address) and instance.ctr("version", timeout=5).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"containerd did not answer on {instance.address} within {timeout} s")


def _remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup and its (empty) children, deepest first."""
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs built from Debian's busybox-static (no image, no registry)."""
    from clave.tools.bundles import BUSYBOX, make_busybox_rootfs

    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not found: install Debian's busybox-static")
    return Path(make_busybox_rootfs(str(tmp_path_factory.mktemp("busybox") / "rootfs")))


@pytest.fixture(scope="module")
def clave() -> Path:
    path = clave_binary()
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} not found: install clave into the test interpreter's environment")
    return path
