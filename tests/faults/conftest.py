"""Fixtures for the fault-injection tests: a busybox rootfs, a Runner whose teardown force-deletes what is
left and asserts nothing remains, and a subreaper so orphaned container inits become ours to reap."""

from __future__ import annotations

import ctypes
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from security.harness import BUSYBOX, Runner

PR_SET_CHILD_SUBREAPER = 36

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fault-injection tests run containers: needs root")


@pytest.fixture(scope="session")
def fault_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing: install Debian's busybox-static")
    from clave.tools.bundles import make_busybox_rootfs

    return Path(make_busybox_rootfs(str(tmp_path_factory.mktemp("faults") / "rootfs")))


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphaned inits (their creating `clave` was killed or exited) are re-parented to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reap_children()


from helpers import reap_children  # noqa: E402


@pytest.fixture
def runner(tmp_path: Path, fault_rootfs: Path, subreaper: None) -> Iterator[Runner]:
    runner = Runner(tmp_path, fault_rootfs, f"clave-fault-{secrets.token_hex(3)}")
    yield runner
    left = runner.cleanup()
    reap_children()
    assert not left, f"left behind: {left}"
