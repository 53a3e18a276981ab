"""Fixtures for the native runtime conformance suite: real containers, run as root through the `clave` CLI.

Every test gets its own ``--root`` state dir, bundle dir and container-id prefix; the teardown force-deletes
whatever the test left and then asserts nothing of it remains: no state dir, cgroup, mount or process.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CLAVE = str(Path(sys.executable).with_name("clave"))  # the venv's console script
BUSYBOX = "/bin/busybox"
CGROUP_ROOT = "/sys/fs/cgroup"
PR_SET_CHILD_SUBREAPER = 36

def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


@pytest.fixture(scope="package", autouse=True)
def _subreaper() -> Iterator[None]:
    """Act as containerd's shim does: a subreaper, so a created container's init becomes our child.
    Only for this package: other tests' orphans must not become our zombies."""
    if os.geteuid() != 0:
        yield
        return
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    yield
    _prctl(PR_SET_CHILD_SUBREAPER, 0)
    reap_zombies()


@pytest.fixture(scope="session")
def shared_rootfs() -> Iterator[Path]:
    """One busybox rootfs for the whole session; bundles point root.path at it when they do not write to it.

    It lives outside pytest's 0700 temp tree so a user namespace's mapped root can reach it."""
    if os.geteuid() != 0:
        pytest.skip("the runtime suite runs containers: needs root")
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing: install Debian's busybox-static")
    from clave.tools.bundles import make_busybox_rootfs

    base = Path(tempfile.mkdtemp(prefix="clave-rootfs-"))
    base.chmod(0o755)
    make_busybox_rootfs(str(base / "rootfs"))
    (base / "rootfs" / "out").mkdir()  # every bundle's results bind: the mount point exists beforehand
    _SHARED_LISTING[str(base / "rootfs")] = _listing(base / "rootfs")
    yield base / "rootfs"
    shutil.rmtree(base)


_SHARED_LISTING: dict[str, list[str]] = {}


def _listing(rootfs: Path) -> list[str]:
    """What a test writing to the shared rootfs would most likely change."""
    return sorted(os.listdir(rootfs)) + [f"etc/{n}" for n in sorted(os.listdir(rootfs / "etc"))] + \
        [f"tmp/{n}" for n in sorted(os.listdir(rootfs / "tmp"))]


def base_config(args: list[str]) -> dict[str, Any]:
    """`clave spec`'s defaults, without a terminal, with a writable root and a /out bind for results."""
    from clave.config.defaults import default_spec

    config = default_spec()
    config["process"]["args"] = args
    config["process"]["terminal"] = False
    config["root"]["readonly"] = False
    return config


class Bundle:
    """A bundle dir with a config.json; ``out`` is a host dir the container sees read-write at /out."""

    def __init__(self, path: Path, shared_rootfs: Path) -> None:
        self.path = path
        self.out = path / "out"
        self.out.mkdir(parents=True)
        self.shared_rootfs = shared_rootfs
        self.config = base_config(["true"])
        self.config["root"]["path"] = str(shared_rootfs)
        self.config["mounts"].append(
            {"destination": "/out", "type": "bind", "source": str(self.out), "options": ["rbind", "rw"]}
        )

    @property
    def process(self) -> dict[str, Any]:
        proc: dict[str, Any] = self.config["process"]
        return proc

    @property
    def linux(self) -> dict[str, Any]:
        linux: dict[str, Any] = self.config["linux"]
        return linux

    def args(self, *args: str) -> Bundle:
        self.process["args"] = list(args)
        return self

    def sh(self, script: str) -> Bundle:
        return self.args("sh", "-c", script)

    def private_rootfs(self) -> Path:
        """Give this bundle its own copy of the rootfs (for tests that write to it)."""
        dest = self.path / "rootfs"
        shutil.copytree(self.shared_rootfs, dest, symlinks=True)
        self.config["root"]["path"] = "rootfs"
        return dest

    @property
    def rootfs(self) -> Path:
        path = Path(self.config["root"]["path"])
        return path if path.is_absolute() else self.path / path

    def write(self, config: dict[str, Any] | None = None) -> Path:
        target = self.path / "config.json"
        target.write_text(json.dumps(self.config if config is None else config, indent=1))
        return target

    def clone_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)


class Clave:
    """Runs the CLI with this test's --root and a JSON --log, from the bundle dir."""

    def __init__(self, root: Path, log: Path, bundle: Bundle, prefix: str) -> None:
        self.root = root
        self.log = log
        self.bundle = bundle
        self.prefix = prefix
        self.inits: list[int] = []

    def id(self, name: str = "c") -> str:
        return f"{self.prefix}-{name}"

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 30,
                 env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        cmd = [CLAVE, "--root", str(self.root), "--log", str(self.log), "--log-format", "json", *args]
        capture = "stdout" not in kwargs and "stderr" not in kwargs
        result = subprocess.run(cmd, input=input, capture_output=capture, timeout=timeout,
                                cwd=self.bundle.path, env=env, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr!r}")
        return result

    def fail(self, *args: str, **kwargs: Any) -> str:
        """Run a command that must fail: one error line on stderr and a JSON error line in the log."""
        self.log.write_text("")
        # Files, not pipes: if create wrongly succeeds, its container would hold a pipe open forever.
        out_path, err_path = self.bundle.path / "fail.stdout", self.bundle.path / "fail.stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            result = self(*args, check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=err, **kwargs)
        assert result.returncode != 0, f"{' '.join(args)} unexpectedly succeeded"
        lines = err_path.read_text().strip().splitlines()
        assert len(lines) == 1, f"expected one error line, got {lines!r}"
        errors = [json.loads(line) for line in self.log.read_text().splitlines()]
        errors = [e for e in errors if e["level"] == "error"]
        assert errors, "no error line in --log"
        assert errors[-1]["msg"] and errors[-1]["time"]
        return lines[0]

    def create(self, cid: str, *extra: str, **kwargs: Any) -> int:
        """`clave create`; the container keeps create's stdout/stderr, so they go to files, not pipes."""
        pid_file = self.bundle.path / f"{cid}.pid"
        self.bundle.write()
        out_path, err_path = self.bundle.path / f"{cid}.stdout", self.bundle.path / f"{cid}.stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            result = self("create", "--bundle", str(self.bundle.path), "--pid-file", str(pid_file), *extra, cid,
                          check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=err, **kwargs)
        if result.returncode != 0:
            raise AssertionError(f"create exited {result.returncode}: {self.stderr(cid)!r}")
        pid = int(pid_file.read_text())
        self.inits.append(pid)
        return pid

    def stdout(self, cid: str) -> str:
        return (self.bundle.path / f"{cid}.stdout").read_text()

    def stderr(self, cid: str) -> str:
        return (self.bundle.path / f"{cid}.stderr").read_text()

    def state(self, cid: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self("state", cid).stdout)
        return doc

    def run(self, *extra: str, cid: str | None = None, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        self.bundle.write()
        return self("run", "--bundle", str(self.bundle.path), *extra, cid or self.id("run"), check=False, **kwargs)

    def output(self, *extra: str, **kwargs: Any) -> str:
        """`clave run` the bundle; asserts exit 0 and returns stdout."""
        result = self.run(*extra, **kwargs)
        assert result.returncode == 0, f"run exited {result.returncode}: {result.stderr!r}"
        return result.stdout.decode()


def reap(pid: int, timeout: float = 5.0) -> int | None:
    """Wait for a container init that we (the subreaper) inherited; returns its wait status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done == pid:
            return status
        time.sleep(0.005)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cgroup") as f:
            where = f.read().replace("\n", " ")
    except OSError:
        state, where = "?", "?"
    raise AssertionError(f"process {pid} did not exit (state {state}, cgroups {where})")


# Reap inits of failed creates that were re-parented to us (the caller reaps, as the spec says).
from helpers import reap_children as reap_zombies  # noqa: E402


def leftovers(root: Path, token: str, paths: list[Path]) -> list[str]:
    """Everything a container named with ``token`` could leave behind on the host."""
    found = []
    if root.exists():
        found += [f"state: {root / n}" for n in os.listdir(root)]
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT):
        found += [f"cgroup: {dirpath}/{d}" for d in dirnames if token in d]
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    found += [f"mount: {p}" for p in paths if f" {p}" in mountinfo]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # exited; reaping it is the caller's job
            with open(f"/proc/{pid}/cgroup") as f:
                if token in f.read():
                    found.append(f"process: {pid}")
        except OSError:
            continue
    return found


@pytest.fixture
def bundle(tmp_path: Path, shared_rootfs: Path) -> Bundle:
    return Bundle(tmp_path / "bundle", shared_rootfs)


@pytest.fixture
def clave(tmp_path: Path, bundle: Bundle) -> Iterator[Clave]:
    token = "ct" + secrets.token_hex(4)
    cli = Clave(tmp_path / "state", tmp_path / "log.json", bundle, token)
    yield cli
    remaining = os.listdir(cli.root) if cli.root.exists() else []
    for cid in remaining:
        cli("delete", "--force", cid, check=False)
    for pid in cli.inits:
        reap(pid)
    reap_zombies()
    found = leftovers(cli.root, token, [bundle.path, bundle.rootfs])
    assert not found, f"left behind: {found}"
    shared = bundle.shared_rootfs
    assert _listing(shared) == _SHARED_LISTING[str(shared)], "the test wrote to the shared rootfs"


@pytest.fixture
def assert_clean(clave: Clave, bundle: Bundle) -> Any:
    """Call after a failure point: nothing of the test's containers may remain."""

    def check() -> None:
        reap_zombies()
        found = leftovers(clave.root, clave.prefix, [bundle.path, bundle.rootfs])
        assert not found, f"left behind: {found}"

    return check
