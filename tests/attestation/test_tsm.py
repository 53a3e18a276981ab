"""configfs-tsm, the report interface the TDX and SEV-SNP attesters share, against a directory that behaves as
the kernel's does for the parts the attesters rely on: an entry's attributes appear on mkdir, ``outblob`` is
produced when read, ``generation`` counts writes, the entry goes with its attributes."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from clave.attestation.attesters import tdx
from clave.attestation.attesters.snp import REPORT_SIZE, SnpAttester
from clave.attestation.attesters.tsm import ATTEMPTS, TsmReports
from clave.attestation.base import AttesterUnavailable

TDX_V4_PREFIX = b"\x04\x00\x02\x00\x81\x00\x00\x00"


class FakeConfigfs(TsmReports):
    def __init__(self, root: Path, provider: str, produce: Callable[[bytes], bytes], racing: bool = False) -> None:
        super().__init__(root)
        self.fake_provider = provider
        self.produce = produce  # inblob -> outblob
        self.racing = racing  # another writer bumps the generation between our two reads
        self.writes = 0
        self.entries: list[Path] = []

    def _make_entry(self) -> Path:
        entry = super()._make_entry()
        (entry / "provider").write_text(self.fake_provider + "\n")
        (entry / "generation").write_text("0\n")
        self.entries.append(entry)
        return entry

    def _remove_entry(self, entry: Path) -> None:
        shutil.rmtree(entry)


@pytest.fixture
def configfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeConfigfs]:
    """A fake's outblob is produced on read, and inblob writes bump the generation, as in the kernel."""
    root = tmp_path / "report"
    root.mkdir()
    fakes: list[FakeConfigfs] = []
    real_read, real_write = Path.read_bytes, Path.write_bytes

    def bump(entry: Path) -> None:
        (entry / "generation").write_text(str(int((entry / "generation").read_text()) + 1))

    def read_bytes(self: Path) -> bytes:
        fake = next((f for f in fakes if self.parent in f.entries), None)
        if fake is not None and self.name == "outblob":
            real_write(self, fake.produce(real_read(self.parent / "inblob")))
            if fake.racing:
                bump(self.parent)
        return real_read(self)

    def write_bytes(self: Path, data: bytes) -> int:  # type: ignore[override]
        written = real_write(self, data)
        fake = next((f for f in fakes if self.parent in f.entries), None)
        if fake is not None and self.name == "inblob":
            fake.writes += 1
            bump(self.parent)
        return written

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)

    def make(provider: str, produce: Callable[[bytes], bytes], racing: bool = False) -> FakeConfigfs:
        fakes.append(FakeConfigfs(root, provider, produce, racing))
        return fakes[-1]

    return make


def test_snp_report_through_configfs_binds_the_report_data(configfs: Callable[..., FakeConfigfs]) -> None:
    fake = configfs("sev_guest", lambda inblob: inblob + bytes(REPORT_SIZE - len(inblob)))
    attester = SnpAttester(vmpl=2, device=Path("/nonexistent/sev-guest"))
    attester.tsm = fake
    attester.available()
    evidence = attester.attest(b"nonce")
    assert evidence.tee == "snp" and evidence.data[:64] == b"nonce".ljust(64, b"\0")
    assert fake.entries and not any(e.exists() for e in fake.entries)  # provider probes, then the report
    assert fake.writes == 1


def test_tdx_quote_through_configfs(configfs: Callable[..., FakeConfigfs], monkeypatch: pytest.MonkeyPatch) -> None:
    fake = configfs("tdx_guest", lambda inblob: TDX_V4_PREFIX + inblob)
    attester = tdx.TdxAttester(device=Path("/nonexistent/tdx_guest"))
    attester.tsm = fake
    monkeypatch.setattr(tdx, "_cpu_flag", lambda flag, cpuinfo=None: flag == "tdx_guest")
    assert attester.attest(b"\7" * 64).data == TDX_V4_PREFIX + b"\7" * 64
    fake.produce = lambda inblob: b"not a quote"
    with pytest.raises(OSError, match="not a TDX ECDSA quote"):
        attester.attest(b"x")


def test_another_provider_is_refused_and_the_entry_removed(configfs: Callable[..., FakeConfigfs]) -> None:
    fake = configfs("tdx_guest", lambda inblob: inblob)
    with pytest.raises(AttesterUnavailable, match="provider is 'tdx_guest', not sev_guest"):
        fake.report(bytes(64), "sev_guest")
    assert not fake.entries[0].exists()


def test_a_report_that_keeps_changing_is_refused(configfs: Callable[..., FakeConfigfs]) -> None:
    fake = configfs("tdx_guest", lambda inblob: TDX_V4_PREFIX + inblob, racing=True)
    with pytest.raises(OSError) as raised:
        fake.report(bytes(64), "tdx_guest")
    assert raised.value.errno == errno.EBUSY and "kept changing" in str(raised.value)
    assert fake.writes == ATTEMPTS and not fake.entries[0].exists()
