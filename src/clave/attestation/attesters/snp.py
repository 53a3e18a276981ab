"""The SEV-SNP attester: asks the AMD secure processor for an attestation report from inside an SNP guest.

Two kernel interfaces, tried in order:

- configfs-tsm (Linux 6.7+): ``mkdir /sys/kernel/config/tsm/report/<name>``, write the 64 report-data bytes
  to ``inblob``, read the report from ``outblob``; ``provider`` must say ``sev_guest``.
- ``/dev/sev-guest``: the ``SNP_GET_REPORT`` ioctl (linux/sev-guest.h) with an ``snp_report_req``; the
  firmware's MSG_REPORT_RSP carries the 1184-byte report at offset 0x20.

The evidence is the bare report; the verifier fetches the VCEK (or gets it as collateral) separately.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import struct
from pathlib import Path

from clave.attestation.attesters.tsm import TSM_REPORT as TSM_REPORT_DIR
from clave.attestation.attesters.tsm import TsmReports
from clave.attestation.base import Attester, AttesterUnavailable, Evidence

SEV_GUEST_DEVICE = Path("/dev/sev-guest")
TSM_PROVIDER = "sev_guest"

REPORT_DATA_SIZE = 64
REPORT_SIZE = 1184
# _IOWR('S', 0x0, struct snp_guest_request_ioctl), the struct being 32 bytes.
SNP_GET_REPORT = (3 << 30) | (32 << 16) | (ord("S") << 8) | 0x0
SNP_MSG_VERSION = 1
SNP_RESPONSE_SIZE = 4000  # struct snp_report_resp
REPORT_OFFSET_IN_RESPONSE = 0x20


class SnpAttester(Attester):
    """Produces SEV-SNP attestation reports when run inside an SNP guest."""

    name = "snp"
    tee = "snp"
    priority = 80

    def __init__(
        self, vmpl: int = 0, device: Path = SEV_GUEST_DEVICE, tsm_report_dir: Path = TSM_REPORT_DIR
    ) -> None:
        if not 0 <= vmpl <= 3:
            raise ValueError(f"VMPL must be 0..3, got {vmpl}")
        self.vmpl = vmpl
        self.device = device
        self.tsm = TsmReports(tsm_report_dir)

    def available(self) -> None:
        if not (self._use_tsm() or self.device.exists()):
            raise AttesterUnavailable(self._unavailable_reason())

    def _unavailable_reason(self) -> str:
        if self.tsm.present():
            return f"no {self.device}, and configfs-tsm is not backed by {TSM_PROVIDER}"
        return f"no {self.device} or configfs-tsm on this host"

    def _use_tsm(self) -> bool:
        """configfs-tsm is present and its provider is the SEV guest driver (not e.g. tdx_guest)."""
        if not self.tsm.present():
            return False
        try:
            return self._tsm_provider() == TSM_PROVIDER
        except OSError:
            return False

    def attest(self, report_data: bytes) -> Evidence:
        if len(report_data) > REPORT_DATA_SIZE:
            raise ValueError(f"report data is {len(report_data)} bytes, at most {REPORT_DATA_SIZE} fit")
        padded = report_data.ljust(REPORT_DATA_SIZE, b"\0")
        if self._use_tsm():
            report = self._report_via_tsm(padded)
        elif self.device.exists():
            report = self._report_via_ioctl(padded)
        else:
            raise AttesterUnavailable(self._unavailable_reason())
        if len(report) != REPORT_SIZE:
            raise OSError(errno.EIO, f"SEV-SNP firmware returned a {len(report)}-byte report")
        return Evidence(tee=self.tee, data=report)

    # -- configfs-tsm ----------------------------------------------------------------------------------

    def _tsm_provider(self) -> str:
        return self.tsm.provider()

    def _report_via_tsm(self, report_data: bytes) -> bytes:
        return self.tsm.report(report_data, TSM_PROVIDER, privlevel=self.vmpl or None)

    # -- /dev/sev-guest --------------------------------------------------------------------------------

    def _report_via_ioctl(self, report_data: bytes) -> bytes:
        request = ctypes.create_string_buffer(report_data + struct.pack("<I", self.vmpl) + bytes(28), 96)
        response = ctypes.create_string_buffer(SNP_RESPONSE_SIZE)
        ioctl_args = bytearray(
            struct.pack("<B7xQQQ", SNP_MSG_VERSION, ctypes.addressof(request), ctypes.addressof(response), 0)
        )
        with open(self.device, "rb", buffering=0) as dev:
            try:
                fcntl.ioctl(dev.fileno(), SNP_GET_REPORT, ioctl_args)
            except OSError as exc:
                (exitinfo2,) = struct.unpack_from("<Q", ioctl_args, 24)
                raise OSError(
                    exc.errno, f"SNP_GET_REPORT failed: {exc.strerror} (exitinfo2 {exitinfo2:#x})"
                ) from exc
        status, report_size = struct.unpack_from("<II", response.raw, 0)
        if status != 0:
            raise OSError(errno.EIO, f"SEV-SNP firmware refused the report request (status {status:#x})")
        start = REPORT_OFFSET_IN_RESPONSE
        return response.raw[start : start + report_size]


PLUGINS = (SnpAttester,)
