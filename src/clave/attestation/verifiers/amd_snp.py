"""AMD SEV-SNP attestation report verifier.

Checks a 1184-byte ATTESTATION_REPORT (versions 2 to 5, SEV-SNP ABI spec table "ATTESTATION_REPORT
Structure") offline: the VCEK or VLEK certificate chains through the ASK (or ASVK) to the AMD root key of
the report's product (Milan, Genoa, Turin), the certificate belongs to the report's chip and TCB, and the
ECDSA P-384 / SHA-384 signature over the first 0x2A0 bytes verifies with it.

Collateral roles: ``vcek.der`` or ``vlek.der`` (DER or PEM), optionally ``ask.pem`` (the ASK or ASVK) or
``ask_ark.pem`` (ASK followed by ARK, the AMD KDS ``cert_chain``). Without them the intermediates shipped
with the trust anchors (``amd_<product>_ask`` / ``amd_<product>_asvk``) are used; the ARK always comes from
the trust anchors (``amd_<product>_ark``).
"""

from __future__ import annotations

import datetime as _dt
import struct
import warnings
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext
from clave.attestation.certs import check_issued_by, check_valid_at, common_name

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0  # the signature covers bytes 0x000..0x29F
SUPPORTED_VERSIONS = range(2, 6)
SIG_ALGO_ECDSA_P384_SHA384 = 1

POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17  # firmware refuses to launch a guest whose policy has this bit clear
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

KEY_INFO_MASK_CHIP_ID = 1 << 1
SIGNING_KEY_NAMES = {0: "vcek", 1: "vlek", 7: "none"}

# VCEK/VLEK X.509 extensions (AMD "Versioned Chip Endorsement Key" spec).
_AMD_OID = "1.3.6.1.4.1.3704.1."
OID_PRODUCT_NAME = _AMD_OID + "2"
OID_HWID = _AMD_OID + "4"
TCB_EXTENSION_OIDS = {
    "bl": _AMD_OID + "3.1",
    "tee": _AMD_OID + "3.2",
    "snp": _AMD_OID + "3.3",
    "ucode": _AMD_OID + "3.8",
    "fmc": _AMD_OID + "3.9",
}

PRODUCTS = ("Milan", "Genoa", "Turin")

# TCB_VERSION byte positions: Turin added an FMC byte and moved the others.
_TCB_LAYOUT = {
    "Milan": {"bl": 0, "tee": 1, "snp": 6, "ucode": 7},
    "Genoa": {"bl": 0, "tee": 1, "snp": 6, "ucode": 7},
    "Turin": {"fmc": 0, "bl": 1, "tee": 2, "snp": 3, "ucode": 7},
}


@dataclass(frozen=True)
class SnpReport:
    """The fields of an SEV-SNP attestation report (integers little-endian as in the report)."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_family: int
    cpuid_model: int
    cpuid_stepping: int
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    signature_r: bytes
    signature_s: bytes

    @property
    def signing_key(self) -> str:
        return SIGNING_KEY_NAMES.get((self.key_info >> 2) & 0x7, "reserved")

    @property
    def chip_id_masked(self) -> bool:
        return bool(self.key_info & KEY_INFO_MASK_CHIP_ID)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]


def parse_report(data: bytes) -> SnpReport:
    """Parse an attestation report; raises VerificationError(FORMAT) when it is not one."""
    if len(data) != REPORT_SIZE:
        raise VerificationError(Layer.FORMAT, f"SEV-SNP report is {len(data)} bytes, expected {REPORT_SIZE}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise VerificationError(Layer.FORMAT, f"unsupported SEV-SNP report version {version}")
    vmpl, signature_algo, current_tcb, platform_info, key_info = struct.unpack_from("<IIQQI", data, 0x30)
    if signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise VerificationError(Layer.FORMAT, f"unsupported SEV-SNP signature algorithm {signature_algo}")
    (reported_tcb,) = struct.unpack_from("<Q", data, 0x180)
    (committed_tcb,) = struct.unpack_from("<Q", data, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", data, 0x1F0)
    signature = data[SIGNED_SIZE:]
    return SnpReport(
        raw=bytes(data),
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        key_info=key_info,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=reported_tcb,
        # CPUID fields exist from version 3 on; version 2 has zeros there.
        cpuid_family=data[0x188],
        cpuid_model=data[0x189],
        cpuid_stepping=data[0x18A],
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=committed_tcb,
        launch_tcb=launch_tcb,
        signature_r=signature[0:72],
        signature_s=signature[72:144],
    )


def decode_tcb(tcb: int, product: str) -> dict[str, int]:
    """Split a TCB_VERSION into its component SVNs for the product's layout."""
    raw = tcb.to_bytes(8, "little")
    return {name: raw[pos] for name, pos in _TCB_LAYOUT[product].items()}


def product_from_cpuid(family: int, model: int) -> str | None:
    """The product line named by the report's CPUID fields, or None when they are absent or unknown."""
    if family == 0x19 and model <= 0x0F:
        return "Milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "Genoa"  # includes Bergamo and Siena
    if family == 0x1A and model <= 0x1F:
        return "Turin"
    return None


def _load_certificate(data: bytes, what: str) -> x509.Certificate:
    with warnings.catch_warnings():
        # AMD issues VCEKs and VLEKs with serial number 0, which cryptography warns about.
        warnings.simplefilter("ignore")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise VerificationError(Layer.CHAIN, f"{what} is not a valid X.509 certificate: {exc}") from None


def _load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificates(data)
            return [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise VerificationError(Layer.CHAIN, f"{what} is not a valid X.509 certificate: {exc}") from None


def _der_content(value: bytes, tag: int) -> bytes | None:
    """The content of one DER TLV with the given tag spanning all of ``value``, else None."""
    if len(value) < 2 or value[0] != tag:
        return None
    length, pos = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, pos = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
    return value[pos:] if len(value) - pos == length else None


def _amd_extension(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def vek_tcb(cert: x509.Certificate) -> dict[str, int]:
    """The TCB component SVNs a VCEK/VLEK was issued for (DER INTEGER extensions)."""
    svns = {}
    for name, oid in TCB_EXTENSION_OIDS.items():
        raw = _amd_extension(cert, oid)
        if raw is None:
            continue
        content = _der_content(raw, 0x02)
        if content is None:
            raise VerificationError(Layer.CHAIN, f"VEK extension {oid} ({name}) is not a DER INTEGER")
        svns[name] = int.from_bytes(content, "big")
    return svns


def vek_hwid(cert: x509.Certificate) -> bytes | None:
    """The VCEK's hardware ID: 64 bytes (Turin: 8), stored raw or as a DER OCTET STRING."""
    raw = _amd_extension(cert, OID_HWID)
    if raw is None or len(raw) in (8, 64):
        return raw
    return _der_content(raw, 0x04) or raw


def vek_product_name(cert: x509.Certificate) -> str | None:
    raw = _amd_extension(cert, OID_PRODUCT_NAME)
    if raw is None:
        return None
    content = _der_content(raw, 0x16)  # IA5String
    return (content if content is not None else raw).decode("ascii", "replace")


def _product_of_issuer(cert: x509.Certificate) -> str | None:
    """'SEV-Milan' / 'SEV-VLEK-Genoa' -> product."""
    suffix = common_name(cert.issuer).rsplit("-", 1)[-1]
    return suffix if suffix in PRODUCTS else None


def _report_signature_der(report: SnpReport) -> bytes:
    # R and S are 72-byte little-endian fields; P-384 uses the low 48 bytes.
    r = int.from_bytes(report.signature_r, "little")
    s = int.from_bytes(report.signature_s, "little")
    return encode_dss_signature(r, s)


def _as_utc(now: _dt.datetime) -> _dt.datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=_dt.UTC)


class SnpVerifier(Verifier):
    """Verifies AMD SEV-SNP attestation reports against the AMD KDS certificate chain."""

    name = "snp"
    tee = "snp"
    priority = 50

    def matches(self, evidence: bytes) -> bool:
        if len(evidence) != REPORT_SIZE:
            return False
        version, _svn, _policy = struct.unpack_from("<IIQ", evidence, 0)
        (signature_algo,) = struct.unpack_from("<I", evidence, 0x34)
        return version in SUPPORTED_VERSIONS and signature_algo == SIG_ALGO_ECDSA_P384_SHA384

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        report = parse_report(evidence)
        now = _as_utc(ctx.now)
        warnings_out: list[str] = []

        vek, role = self._signing_certificate(report, ctx)
        product = self._product(report, vek, role)
        self._check_chain(vek, role, product, ctx, now)
        self._check_vek_matches_report(vek, role, report, product, warnings_out)
        self._check_signature(report, vek, role)
        self._check_fields(report, product)

        claims = self._claims(report, product, role)
        if ctx.expected_report_data is not None:
            expected = ctx.expected_report_data
            if len(expected) > len(report.report_data) or report.report_data[: len(expected)] != expected:
                raise VerificationError(
                    Layer.KEY_BINDING,
                    f"report_data {report.report_data.hex()} does not carry the expected {expected.hex()}",
                )
        return VerifiedEvidence(tee=self.tee, claims=claims, warnings=warnings_out)

    # -- steps -----------------------------------------------------------------------------------------

    def _signing_certificate(self, report: SnpReport, ctx: VerifyContext) -> tuple[x509.Certificate, str]:
        if report.signing_key == "none":
            raise VerificationError(Layer.SIGNATURE, "report is unsigned (SIGNING_KEY = none)")
        if report.signing_key not in ("vcek", "vlek"):
            raise VerificationError(Layer.FORMAT, "report names a reserved SIGNING_KEY value")
        role = report.signing_key
        data = ctx.collateral.get(f"{role}.der")
        if data is None:
            raise VerificationError(
                Layer.COLLATERAL, f"report is signed by the {role.upper()}; collateral has no {role}.der"
            )
        return _load_certificate(data, role.upper()), role

    def _product(self, report: SnpReport, vek: x509.Certificate, role: str) -> str:
        from_chain = _product_of_issuer(vek)
        from_cpuid = product_from_cpuid(report.cpuid_family, report.cpuid_model)
        if from_cpuid and from_chain and from_cpuid != from_chain:
            raise VerificationError(
                Layer.CHAIN,
                f"report's CPUID says {from_cpuid} but the {role.upper()} is issued by "
                f"{common_name(vek.issuer)}",
            )
        product = from_cpuid or from_chain
        if product is None:
            raise VerificationError(
                Layer.CHAIN, f"cannot tell the AMD product from issuer {common_name(vek.issuer)!r}"
            )
        return product

    def _check_chain(
        self, vek: x509.Certificate, role: str, product: str, ctx: VerifyContext, now: _dt.datetime
    ) -> None:
        ark = _load_certificate(ctx.roots.pem(f"amd_{product.lower()}_ark"), f"ARK-{product}")
        intermediate_name = "ASK" if role == "vcek" else "ASVK"
        intermediate = self._intermediate(role, product, ctx, ark)
        check_issued_by(vek, intermediate, role.upper())
        check_issued_by(intermediate, ark, intermediate_name)
        check_issued_by(ark, ark, f"ARK-{product}")
        for cert, what in ((vek, role.upper()), (intermediate, intermediate_name), (ark, f"ARK-{product}")):
            check_valid_at(cert, now, what)

    def _intermediate(
        self, role: str, product: str, ctx: VerifyContext, ark: x509.Certificate
    ) -> x509.Certificate:
        for collateral_role in ("ask.pem", "ask_ark.pem"):
            data = ctx.collateral.get(collateral_role)
            if data is None:
                continue
            certs = _load_certificates(data, collateral_role)
            if not certs:
                raise VerificationError(Layer.CHAIN, f"{collateral_role} holds no certificate")
            if len(certs) > 1 and certs[1].public_bytes(Encoding.DER) != ark.public_bytes(Encoding.DER):
                raise VerificationError(
                    Layer.CHAIN, f"the ARK in {collateral_role} is not the trusted ARK-{product}"
                )
            return certs[0]
        root_name = f"amd_{product.lower()}_{'ask' if role == 'vcek' else 'asvk'}"
        return _load_certificate(ctx.roots.pem(root_name), root_name)

    def _check_vek_matches_report(
        self, vek: x509.Certificate, role: str, report: SnpReport, product: str, notes: list[str]
    ) -> None:
        """A VCEK is derived from one chip's secret and one TCB: both must be the report's."""
        if role == "vcek":
            hwid = vek_hwid(vek)
            if hwid is None:
                raise VerificationError(Layer.CHAIN, "VCEK has no hwID extension")
            if report.chip_id_masked or not any(report.chip_id):
                notes.append("chip_id is masked in the report; VCEK hwID not compared")
            elif report.chip_id[: len(hwid)] != hwid:
                raise VerificationError(
                    Layer.CHAIN,
                    f"VCEK is for chip {hwid.hex()}, but the report is from chip {report.chip_id.hex()}",
                )
        cert_tcb = vek_tcb(vek)
        reported = decode_tcb(report.reported_tcb, product)
        for component, svn in reported.items():
            if component not in cert_tcb:
                raise VerificationError(Layer.CHAIN, f"{role.upper()} lacks the {component} SVN extension")
            if cert_tcb[component] != svn:
                raise VerificationError(
                    Layer.CHAIN,
                    f"{role.upper()} is for {component} SVN {cert_tcb[component]}, "
                    f"but the report's reported_tcb has {svn}",
                )

    def _check_signature(self, report: SnpReport, vek: x509.Certificate, role: str) -> None:
        if any(report.signature_r[48:]) or any(report.signature_s[48:]):
            raise VerificationError(Layer.SIGNATURE, "signature R or S exceeds 48 bytes")
        key = vek.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise VerificationError(Layer.CHAIN, f"{role.upper()} key is not ECDSA P-384")
        try:
            key.verify(_report_signature_der(report), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise VerificationError(
                Layer.SIGNATURE, f"report signature does not verify with the {role.upper()}"
            ) from None

    def _check_fields(self, report: SnpReport, product: str) -> None:
        if not report.policy & POLICY_RESERVED_ONE:
            raise VerificationError(Layer.FORMAT, "policy bit 17 (reserved, always one) is clear")
        if report.vmpl > 3:
            raise VerificationError(Layer.FORMAT, f"VMPL {report.vmpl} is out of range 0..3")
        # Firmware only lets the host report a TCB at or below the one actually running.
        reported = decode_tcb(report.reported_tcb, product)
        current = decode_tcb(report.current_tcb, product)
        for component, svn in reported.items():
            if svn > current[component]:
                raise VerificationError(
                    Layer.TCB,
                    f"reported_tcb {component} SVN {svn} is above the current {current[component]}",
                )

    def _claims(self, report: SnpReport, product: str, role: str) -> dict[str, Any]:
        return {
            "measurement": report.measurement.hex(),
            "host_data": report.host_data.hex(),
            "chip_id": report.chip_id.hex(),
            "policy": hex(report.policy),
            "debug": bool(report.policy & POLICY_DEBUG),
            "report_data": report.report_data.hex(),
            "version": report.version,
            "product": product,
            "signing_key": role,
            "vmpl": report.vmpl,
            "guest_svn": report.guest_svn,
            "family_id": report.family_id.hex(),
            "image_id": report.image_id.hex(),
            "id_key_digest": report.id_key_digest.hex(),
            "author_key_digest": report.author_key_digest.hex(),
            "report_id": report.report_id.hex(),
            "report_id_ma": report.report_id_ma.hex(),
            "platform_info": hex(report.platform_info),
            "migrate_ma": bool(report.policy & POLICY_MIGRATE_MA),
            "smt_allowed": bool(report.policy & POLICY_SMT),
            "single_socket": bool(report.policy & POLICY_SINGLE_SOCKET),
            "reported_tcb": f"{report.reported_tcb:#018x}",
            "current_tcb": f"{report.current_tcb:#018x}",
            "committed_tcb": f"{report.committed_tcb:#018x}",
            "launch_tcb": f"{report.launch_tcb:#018x}",
            "tcb": decode_tcb(report.reported_tcb, product),
        }


PLUGINS = (SnpVerifier,)
