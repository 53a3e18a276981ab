"""configfs-tsm (Linux 6.7+): the guest kernel's one interface for TEE reports, shared by the TDX and SEV-SNP
attesters.

``mkdir <root>/<name>`` creates a report entry whose attributes the kernel provides: ``provider`` (``tdx_guest``,
``sev_guest``...), ``privlevel`` (SNP's VMPL), ``inblob`` (up to 64 bytes of report data), ``outblob`` (the
report or quote, produced on read) and ``generation`` (bumped by every write, so that a reader can tell that
another writer changed the entry between its write and its read). ``rmdir`` removes the entry.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from clave.attestation.base import AttesterUnavailable

TSM_REPORT = Path("/sys/kernel/config/tsm/report")
ATTEMPTS = 3  # a concurrent writer bumps the generation: try again, then give up


class TsmReports:
    """The report entries under one configfs-tsm root."""

    def __init__(self, root: Path = TSM_REPORT) -> None:
        self.root = root

    def present(self) -> bool:
        return self.root.is_dir()

    def _make_entry(self) -> Path:
        entry = self.root / f"clave-{os.getpid()}-{os.urandom(4).hex()}"
        entry.mkdir()
        return entry

    def _remove_entry(self, entry: Path) -> None:
        entry.rmdir()  # configfs removes the attributes with the directory

    def provider(self) -> str:
        entry = self._make_entry()
        try:
            return (entry / "provider").read_text().strip()
        finally:
            self._remove_entry(entry)

    def report(self, inblob: bytes, provider: str, privlevel: int | None = None) -> bytes:
        """The report binding ``inblob``, from an entry that ``provider`` must back."""
        entry = self._make_entry()
        try:
            found = (entry / "provider").read_text().strip()
            if found != provider:
                raise AttesterUnavailable(f"configfs-tsm provider is {found!r}, not {provider}")
            if privlevel is not None:
                (entry / "privlevel").write_text(str(privlevel))
            for _ in range(ATTEMPTS):
                (entry / "inblob").write_bytes(inblob)
                generation = (entry / "generation").read_text().strip()
                report = (entry / "outblob").read_bytes()
                if (entry / "generation").read_text().strip() == generation:
                    return report
            raise OSError(errno.EBUSY, f"{entry}: the report kept changing under concurrent writers")
        finally:
            self._remove_entry(entry)
