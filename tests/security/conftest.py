"""Fixtures for the containment tests: a busybox rootfs with a static probe binary, and a Runner whose
teardown force-deletes every container and asserts nothing of it is left."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from security.harness import BUSYBOX, Runner, build_probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containment tests run containers: needs root")


@pytest.fixture(scope="session")
def secure_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs with /bin/probe (see probe.c) and its setuid-root copy /bin/probe-suid."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing: install Debian's busybox-static")
    from clave.tools.bundles import make_busybox_rootfs

    rootfs = Path(make_busybox_rootfs(str(tmp_path_factory.mktemp("secure") / "rootfs")))
    if build_probe(rootfs / "bin/probe") is None:
        pytest.skip("gcc with a static libc (libc6-dev) is needed to build the probe")
    # A setuid-root copy: exec'ing it must not give back capabilities the container dropped.
    shutil.copy2(rootfs / "bin/probe", rootfs / "bin/probe-suid")
    os.chmod(rootfs / "bin/probe-suid", 0o4755)
    return rootfs


@pytest.fixture
def runner(tmp_path: Path, secure_rootfs: Path) -> Iterator[Runner]:
    runner = Runner(tmp_path, secure_rootfs, f"clave-sec-{secrets.token_hex(3)}")
    yield runner
    left = runner.cleanup()
    assert not left, f"left behind: {left}"
