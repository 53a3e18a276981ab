"""TDX attester: a DCAP quote (v4/v5) from the guest kernel's configfs-tsm report interface.

Linux (6.7+) exposes quote generation through configfs: create a directory under
``/sys/kernel/config/tsm/report``, write up to 64 bytes of report data to ``inblob`` and read the quote from
``outblob``; the kernel asks the host's quote generation service. ``/dev/tdx_guest`` alone only yields a
TDREPORT (ioctl TDX_CMD_GET_REPORT0), which needs a host-side quoting service to become verifiable evidence.
"""

from __future__ import annotations

from pathlib import Path

from clave.attestation.attesters.tsm import TSM_REPORT, TsmReports
from clave.attestation.base import Attester, AttesterUnavailable, Evidence

TDX_GUEST_DEVICE = Path("/dev/tdx_guest")
REPORT_DATA_LEN = 64
_TDX_QUOTE_PREFIXES = (b"\x04\x00\x02\x00\x81\x00\x00\x00", b"\x05\x00\x02\x00\x81\x00\x00\x00")


def _cpu_flag(flag: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())


def _pad_report_data(report_data: bytes) -> bytes:
    if len(report_data) > REPORT_DATA_LEN:
        raise ValueError(f"report data is {len(report_data)} bytes; at most {REPORT_DATA_LEN} fit in a quote")
    return report_data.ljust(REPORT_DATA_LEN, b"\x00")


class TdxAttester(Attester):
    name = "tdx_ecdsa"
    tee = "tdx"
    priority = 80

    def __init__(self, tsm_root: Path = TSM_REPORT, device: Path = TDX_GUEST_DEVICE) -> None:
        self.tsm = TsmReports(tsm_root)
        self.device = device

    def available(self) -> None:
        tsm = self.tsm.present()
        guest = self.device.exists() or _cpu_flag("tdx_guest")
        if tsm and guest:
            return
        if guest:
            raise AttesterUnavailable(
                f"this is a TDX guest but configfs-tsm ({self.tsm.root}) is missing: mount configfs "
                "(mount -t configfs none /sys/kernel/config) on a kernel with TSM reports (6.7+)"
            )
        if tsm:
            raise AttesterUnavailable(
                f"configfs-tsm is present but this is not a TDX guest (no {self.device}, no tdx_guest CPU flag)"
            )
        raise AttesterUnavailable(f"no {self.device} or configfs-tsm ({self.tsm.root}) on this host")

    def attest(self, report_data: bytes) -> Evidence:
        inblob = _pad_report_data(report_data)
        self.available()
        quote = self.tsm.report(inblob, "tdx_guest")
        if not quote.startswith(_TDX_QUOTE_PREFIXES):
            raise OSError(f"configfs-tsm returned {len(quote)} bytes that are not a TDX ECDSA quote")
        return Evidence(tee=self.tee, data=quote)


PLUGINS = (TdxAttester,)
