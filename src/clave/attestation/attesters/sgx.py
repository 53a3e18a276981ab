"""SGX attester: a DCAP ECDSA quote (v3) for the enclave this process runs in.

A quote needs an enclave report, which only code inside an enclave can produce; the host's
``/dev/sgx_enclave`` alone is not enough. Inside a Gramine SGX enclave configured for DCAP
(``sgx.remote_attestation = "dcap"``) the LibOS offers the quoting library through its pseudo-files:
write the report data to ``/dev/attestation/user_report_data`` and read ``/dev/attestation/quote``.
"""

from __future__ import annotations

from pathlib import Path

from clave.attestation.base import Attester, AttesterUnavailable, Evidence

SGX_DEVICE = Path("/dev/sgx_enclave")
ATTESTATION_DIR = Path("/dev/attestation")
REPORT_DATA_LEN = 64
_SGX_QUOTE_PREFIX = b"\x03\x00\x02\x00\x00\x00\x00\x00"


class SgxAttester(Attester):
    name = "sgx_ecdsa"
    tee = "sgx"
    priority = 80

    def __init__(self, attestation_dir: Path = ATTESTATION_DIR, device: Path = SGX_DEVICE) -> None:
        self.attestation_dir = attestation_dir
        self.device = device

    def available(self) -> None:
        quote = self.attestation_dir / "quote"
        if quote.exists():
            kind_file = self.attestation_dir / "attestation_type"
            kind = kind_file.read_text().strip() if kind_file.exists() else "unknown"
            if kind != "dcap":
                raise AttesterUnavailable(f"enclave attestation type is {kind!r}, not 'dcap' ({kind_file})")
            return
        if self.device.exists():
            raise AttesterUnavailable(
                f"{self.device} exists but this process is not inside an SGX enclave with DCAP quoting "
                f'(no {quote}): run it under Gramine with sgx.remote_attestation = "dcap"'
            )
        raise AttesterUnavailable(f"no {self.device} on this host and not inside an SGX enclave ({quote})")

    def attest(self, report_data: bytes) -> Evidence:
        if len(report_data) > REPORT_DATA_LEN:
            raise ValueError(f"report data is {len(report_data)} bytes; at most {REPORT_DATA_LEN} fit in a quote")
        self.available()
        (self.attestation_dir / "user_report_data").write_bytes(report_data.ljust(REPORT_DATA_LEN, b"\x00"))
        quote = (self.attestation_dir / "quote").read_bytes()
        if not quote.startswith(_SGX_QUOTE_PREFIX):
            raise OSError(f"{self.attestation_dir / 'quote'} returned {len(quote)} bytes that are not an SGX quote")
        return Evidence(tee=self.tee, data=quote)


PLUGINS = (SgxAttester,)
