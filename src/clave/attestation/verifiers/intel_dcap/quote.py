"""Parsing of Intel DCAP ECDSA quotes: SGX v3 (and v4), TDX v4 and v5.

Layouts follow Intel's "SGX ECDSA Quote Library API" and "TDX DCAP Quoting Library API" documents. Every
length is taken from the quote itself; bytes after the declared signature data (TDX quote buffers are often
zero-padded to 5006 or 8000 bytes) are ignored because nothing signs them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from clave.attestation.base import Layer, VerificationError

HEADER_LEN = 48
SGX_REPORT_LEN = 384
TD10_REPORT_LEN = 584
TD15_REPORT_LEN = 648

TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

CERT_DATA_PCK_CHAIN = 5  # PEM: PCK leaf, PCK CA, root
CERT_DATA_QE_REPORT = 6  # v4+/TDX: QE report + signature + auth data + nested certification data

# v5 body descriptor types
_BODY_SGX = 1
_BODY_TD10 = 2
_BODY_TD15 = 3


class _Reader:
    """Bounds-checked cursor over a byte string; every overrun is a FORMAT error naming the field."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = offset
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise VerificationError(
                Layer.FORMAT, f"quote truncated in {what} ({n} bytes needed at {self.pos}, end {self.end})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> QuoteHeader:
        version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", raw, 0)
        return cls(version, key_type, tee_type, qe_svn, pce_svn, raw[12:28], raw[28:48])


@dataclass(frozen=True)
class SgxReportBody:
    """The 384-byte SGX REPORTBODY (enclave report, also the QE report)."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> SgxReportBody:
        return cls(
            raw=raw,
            cpu_svn=raw[0:16],
            misc_select=int.from_bytes(raw[16:20], "little"),
            attributes=raw[48:64],
            mr_enclave=raw[64:96],
            mr_signer=raw[128:160],
            isv_prod_id=int.from_bytes(raw[256:258], "little"),
            isv_svn=int.from_bytes(raw[258:260], "little"),
            report_data=raw[320:384],
        )

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & 0x02)  # SGX ATTRIBUTES.DEBUG


@dataclass(frozen=True)
class TdReportBody:
    """TD report body: 584 bytes (TDX 1.0) or 648 bytes (TDX 1.5: + TEE_TCB_SVN2, MRSERVICETD)."""

    raw: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_servicetd: bytes | None

    @classmethod
    def parse(cls, raw: bytes) -> TdReportBody:
        r = _Reader(raw)
        fields = {
            name: r.take(n, name)
            for name, n in (
                ("tee_tcb_svn", 16),
                ("mr_seam", 48),
                ("mr_signer_seam", 48),
                ("seam_attributes", 8),
                ("td_attributes", 8),
                ("xfam", 8),
                ("mr_td", 48),
                ("mr_config_id", 48),
                ("mr_owner", 48),
                ("mr_owner_config", 48),
            )
        }
        rtmrs = (r.take(48, "rtmr0"), r.take(48, "rtmr1"), r.take(48, "rtmr2"), r.take(48, "rtmr3"))
        report_data = r.take(64, "report_data")
        svn2 = servicetd = None
        if len(raw) == TD15_REPORT_LEN:
            svn2, servicetd = r.take(16, "tee_tcb_svn2"), r.take(48, "mr_servicetd")
        return cls(raw=raw, rtmrs=rtmrs, report_data=report_data, tee_tcb_svn2=svn2, mr_servicetd=servicetd, **fields)

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & 0x01)  # TD_ATTRIBUTES.TUD.DEBUG


@dataclass(frozen=True)
class Quote:
    """A parsed quote. ``signed`` is exactly the bytes the attestation key signed."""

    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    signed: bytes
    signature: bytes  # r || s, 64 bytes
    attestation_key: bytes  # x || y, 64 bytes
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    trailing: int  # bytes after the signature data (zero padding), unsigned and ignored


def sniff(data: bytes) -> tuple[int, int, int] | None:
    """(version, attestation key type, TEE type) when ``data`` starts like a DCAP quote, else None."""
    if len(data) < HEADER_LEN:
        return None
    version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if version not in (3, 4, 5) or key_type != ATT_KEY_ECDSA_P256 or tee_type not in (TEE_SGX, TEE_TDX):
        return None
    return version, key_type, tee_type


def parse_quote(data: bytes) -> Quote:
    """Parse a quote; raise VerificationError(FORMAT) for anything malformed or unsupported."""
    r = _Reader(data)
    header = QuoteHeader.parse(r.take(HEADER_LEN, "header"))
    if header.version not in (3, 4, 5):
        raise VerificationError(Layer.FORMAT, f"unsupported quote version {header.version}")
    if header.att_key_type != ATT_KEY_ECDSA_P256:
        raise VerificationError(Layer.FORMAT, f"unsupported attestation key type {header.att_key_type}")
    if header.version == 3 and header.tee_type != TEE_SGX:
        raise VerificationError(Layer.FORMAT, f"quote v3 with TEE type {header.tee_type:#x}")
    if header.tee_type not in (TEE_SGX, TEE_TDX):
        raise VerificationError(Layer.FORMAT, f"unknown TEE type {header.tee_type:#x}")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise VerificationError(Layer.FORMAT, f"QE vendor {header.qe_vendor_id.hex()} is not Intel's")

    body: SgxReportBody | TdReportBody
    if header.version == 5:
        body_type = r.u16("body type")
        body_len = r.u32("body size")
        expected = {_BODY_SGX: SGX_REPORT_LEN, _BODY_TD10: TD10_REPORT_LEN, _BODY_TD15: TD15_REPORT_LEN}
        if expected.get(body_type) != body_len:
            raise VerificationError(Layer.FORMAT, f"v5 body type {body_type} with size {body_len}")
        if (body_type == _BODY_SGX) != (header.tee_type == TEE_SGX):
            raise VerificationError(Layer.FORMAT, f"v5 body type {body_type} for TEE {header.tee_type:#x}")
        raw_body = r.take(body_len, "report body")
    else:
        raw_body = r.take(SGX_REPORT_LEN if header.tee_type == TEE_SGX else TD10_REPORT_LEN, "report body")
    body = SgxReportBody.parse(raw_body) if header.tee_type == TEE_SGX else TdReportBody.parse(raw_body)
    signed = data[: r.pos]

    sig_len = r.u32("signature data length")
    sig = _Reader(data, r.pos, r.pos + sig_len)
    if r.pos + sig_len > len(data):
        raise VerificationError(
            Layer.FORMAT,
            f"quote truncated: {sig_len} bytes of signature data declared, {len(data) - r.pos} present",
        )
    signature = sig.take(64, "quote signature")
    attestation_key = sig.take(64, "attestation key")

    if header.version == 3:
        qe_report, qe_sig, auth, chain = _qe_certification(sig)
    else:
        cert_type = sig.u16("certification data type")
        cert_len = sig.u32("certification data size")
        if cert_type != CERT_DATA_QE_REPORT:
            raise VerificationError(Layer.FORMAT, f"certification data type {cert_type}, expected 6")
        inner = _Reader(data, sig.pos, sig.pos + cert_len)
        sig.take(cert_len, "QE report certification data")
        qe_report, qe_sig, auth, chain = _qe_certification(inner)
    trailing = len(data) - (r.pos + sig_len)
    return Quote(header, body, signed, signature, attestation_key, qe_report, qe_sig, auth, chain, trailing)


def _qe_certification(r: _Reader) -> tuple[SgxReportBody, bytes, bytes, bytes]:
    qe_report = SgxReportBody.parse(r.take(SGX_REPORT_LEN, "QE report"))
    qe_sig = r.take(64, "QE report signature")
    auth = r.take(r.u16("QE auth data size"), "QE auth data")
    cert_type = r.u16("PCK certification data type")
    cert_len = r.u32("PCK certification data size")
    if cert_type != CERT_DATA_PCK_CHAIN:
        raise VerificationError(
            Layer.FORMAT, f"PCK certification data type {cert_type} unsupported (need 5, a PEM chain)"
        )
    chain = r.take(cert_len, "PCK certificate chain")
    return qe_report, qe_sig, auth, chain
