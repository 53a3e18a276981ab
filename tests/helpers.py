"""Helpers every test package shares (on sys.path through pyproject's pytest ``pythonpath``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CLAVE = str(BIN / "clave")  # the test interpreter's console script (any venv)


def alive(pid: int) -> bool:
    """True for a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    """``data`` with one bit flipped (forged evidence, tampered files)."""
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def reap_children() -> None:
    """Collect every exited child without blocking (orphaned inits re-parented to us)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_clave(*args: str, root: Path | str | None = None, cwd: Path | str | None = None, timeout: float = 60,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `clave` CLI (``--root ROOT`` first when given), its stdout and stderr through files, not pipes: a
    created or detached container keeps the CLI's stdio open, and a pipe would never see EOF."""
    command = [CLAVE, *(["--root", str(root)] if root is not None else []), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        result = subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True,
                                timeout=timeout, env=None if env is None else {**os.environ, **env})
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(result.args, result.returncode, out.read(), err.read())


def swtpm_fixture(scope: str = "function") -> object:
    """A pytest fixture ``swtpm`` of the given scope: a fresh swtpm on loopback, yielding its TCTI string."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        sys.path.insert(0, str(Path(__file__).parent / "attestation"))
        from swtpm_process import running_swtpm

        with running_swtpm(tmp_path_factory.mktemp("swtpm")) as tcti:
            yield tcti

    return swtpm
