"""TCB status from verified TCB info and QE identity, following Intel's Quote Verification Library (QVL).

Platform level: the first TCB level (Intel lists them best first) whose 16 SGX component SVNs and PCESVN are
all <= the PCK certificate's; for TDX its TDX component SVNs must also be <= TEE_TCB_SVN.

TDX matching rule (two exist; this follows Intel QVL, qve.cpp ``isTdxTcbHigherOrEqual``): when
TEE_TCB_SVN[1] (the TDX module major version) is non-zero, bytes 0 and 1 are not compared against the TCB
level; the module is instead judged by its own identity ``TDX_<major>`` in ``tdxModuleIdentities`` (mrsigner,
attributes, and a TCB level by minor SVN = TEE_TCB_SVN[0]). dcap-qvl compares all 16 bytes instead, which
rates some genuine modules (e.g. GCP COS 113, TEE_TCB_SVN 04 01 07..) OutOfDate where Intel says UpToDate.

The platform status is then converged with the QE identity status and the TDX module status as QVL does:
an OutOfDate QE/module downgrades UpToDate/SWHardeningNeeded to OutOfDate and the Configuration* statuses to
OutOfDateConfigurationNeeded; Revoked wins. A QE whose ISVSVN is below every level counts as Revoked (QVL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clave.attestation.base import Layer, VerificationError
from clave.attestation.verifiers.intel_dcap.pck import PckInfo
from clave.attestation.verifiers.intel_dcap.quote import SgxReportBody, TdReportBody

UP_TO_DATE = "UpToDate"
SW_HARDENING_NEEDED = "SWHardeningNeeded"
CONFIGURATION_NEEDED = "ConfigurationNeeded"
CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"
NO_MATCHING_TCB_LEVEL = "NoMatchingTcbLevel"

STATUSES = (
    UP_TO_DATE,
    SW_HARDENING_NEEDED,
    CONFIGURATION_NEEDED,
    CONFIGURATION_AND_SW_HARDENING_NEEDED,
    OUT_OF_DATE,
    OUT_OF_DATE_CONFIGURATION_NEEDED,
    REVOKED,
)


@dataclass
class TcbVerdict:
    status: str | None = None  # None: no TCB info given
    platform_status: str | None = None
    tcb_date: str | None = None
    advisory_ids: list[str] = field(default_factory=list)
    qe_status: str | None = None
    tdx_module: str | None = None  # e.g. "TDX_01"
    tdx_module_status: str | None = None


def _status(level: dict[str, Any], role: str) -> str:
    status = level.get("tcbStatus")
    if status not in STATUSES:
        raise VerificationError(Layer.COLLATERAL, f"{role}: unknown tcbStatus {status!r}")
    return str(status)


def _component_svns(tcb: dict[str, Any], key: str, v2_prefix: str | None, role: str) -> list[int]:
    try:
        if key in tcb:  # TCB info v3: [{"svn": n, ...} x 16]
            svns = [int(c["svn"]) for c in tcb[key]]
        elif v2_prefix is not None:  # TCB info v2: "sgxtcbcomp01svn"...
            svns = [int(tcb[f"{v2_prefix}{i:02d}svn"]) for i in range(1, 17)]
        else:
            raise KeyError(key)
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(Layer.COLLATERAL, f"{role}: malformed TCB level ({exc})") from None
    if len(svns) != 16:
        raise VerificationError(Layer.COLLATERAL, f"{role}: TCB level has {len(svns)} components, not 16")
    return svns


def converge(platform: str, other: str | None) -> str:
    if other == REVOKED:
        return REVOKED
    if other == OUT_OF_DATE:
        if platform in (UP_TO_DATE, SW_HARDENING_NEEDED):
            return OUT_OF_DATE
        if platform in (CONFIGURATION_NEEDED, CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return OUT_OF_DATE_CONFIGURATION_NEEDED
    return platform


def check_tcb_info_applies(tcb_info: dict[str, Any], pck: PckInfo, tee: str, role: str) -> None:
    expected_id = "TDX" if tee == "tdx" else "SGX"
    tcb_id = tcb_info.get("id", "SGX")  # v2 documents have no id and are SGX
    if tcb_id != expected_id:
        raise VerificationError(Layer.COLLATERAL, f"{role} is for {tcb_id}, not {expected_id}")
    if tcb_info.get("version") not in (2, 3):
        raise VerificationError(Layer.COLLATERAL, f"{role}: unsupported version {tcb_info.get('version')!r}")
    if str(tcb_info.get("fmspc", "")).lower() != pck.fmspc.hex():
        raise VerificationError(
            Layer.COLLATERAL, f"{role} is for FMSPC {tcb_info.get('fmspc')}, the PCK's is {pck.fmspc.hex()}"
        )
    if str(tcb_info.get("pceId", "")).lower() != pck.pceid.hex():
        raise VerificationError(Layer.COLLATERAL, f"{role} is for PCEID {tcb_info.get('pceId')}, not {pck.pceid.hex()}")


def platform_level(
    tcb_info: dict[str, Any], pck: PckInfo, tee_tcb_svn: bytes | None, role: str
) -> dict[str, Any] | None:
    """The first TCB level the platform meets, or None."""
    levels = tcb_info.get("tcbLevels")
    if not isinstance(levels, list):
        raise VerificationError(Layer.COLLATERAL, f"{role} has no tcbLevels")
    skip_module = 2 if tee_tcb_svn is not None and tee_tcb_svn[1] > 0 else 0
    for level in levels:
        tcb = level.get("tcb") if isinstance(level, dict) else None
        if not isinstance(tcb, dict):
            raise VerificationError(Layer.COLLATERAL, f"{role}: malformed TCB level")
        sgx = _component_svns(tcb, "sgxtcbcomponents", "sgxtcbcomp", role)
        if any(have < need for have, need in zip(pck.sgx_tcb_components, sgx, strict=True)):
            continue
        if pck.pcesvn < int(tcb.get("pcesvn", 0)):
            continue
        if tee_tcb_svn is not None:
            tdx = _component_svns(tcb, "tdxtcbcomponents", None, role)
            if any(tee_tcb_svn[i] < tdx[i] for i in range(skip_module, 16)):
                continue
        return level
    return None


def _hex(value: Any) -> bytes:
    return bytes.fromhex(str(value))


def tdx_module_status(tcb_info: dict[str, Any], body: TdReportBody, role: str) -> tuple[str | None, str | None]:
    """(module identity id, its status) for TDX TCB info v3; (None, None) when not applicable."""
    major, minor = body.tee_tcb_svn[1], body.tee_tcb_svn[0]
    if major == 0:
        module = tcb_info.get("tdxModule")
        if isinstance(module, dict):
            _check_module_identity(module, body, "tdxModule", role)
        return None, None
    wanted = f"TDX_{major:02X}"
    identities = tcb_info.get("tdxModuleIdentities") or []
    identity = next((i for i in identities if str(i.get("id", "")).upper() == wanted), None)
    if identity is None:
        raise VerificationError(Layer.TCB, f"{role} has no identity for TDX module {wanted}")
    _check_module_identity(identity, body, wanted, role)
    for level in identity.get("tcbLevels", []):
        if minor >= int(level["tcb"]["isvsvn"]):
            return wanted, _status(level, role)
    return wanted, NO_MATCHING_TCB_LEVEL


def _check_module_identity(identity: dict[str, Any], body: TdReportBody, name: str, role: str) -> None:
    try:
        mrsigner = _hex(identity["mrsigner"])
        attributes, mask = _hex(identity["attributes"]), _hex(identity["attributesMask"])
    except (KeyError, ValueError) as exc:
        raise VerificationError(Layer.COLLATERAL, f"{role}: malformed {name} identity ({exc})") from None
    if mrsigner != body.mr_signer_seam:
        raise VerificationError(Layer.TCB, f"TDX module MRSIGNER {body.mr_signer_seam.hex()} is not {name}'s")
    masked = bytes(a & m for a, m in zip(body.seam_attributes, mask, strict=False))
    if masked != bytes(a & m for a, m in zip(attributes, mask, strict=False)):
        raise VerificationError(Layer.TCB, f"TDX module attributes {body.seam_attributes.hex()} are not {name}'s")


def qe_identity_level(identity: dict[str, Any], qe: SgxReportBody, tee: str, role: str) -> dict[str, Any] | None:
    """Check the QE report against the QE identity; return the QE's TCB level (None: below every level)."""
    expected_id = "TD_QE" if tee == "tdx" else "QE"
    if identity.get("id") != expected_id:
        raise VerificationError(Layer.COLLATERAL, f"{role} is for {identity.get('id')!r}, not {expected_id}")
    try:
        misc, misc_mask = int(identity["miscselect"], 16), int(identity["miscselectMask"], 16)
        attributes, attr_mask = _hex(identity["attributes"]), _hex(identity["attributesMask"])
        mrsigner, prod_id = _hex(identity["mrsigner"]), int(identity["isvprodid"])
        levels = list(identity["tcbLevels"])
    except (KeyError, ValueError, TypeError) as exc:
        raise VerificationError(Layer.COLLATERAL, f"{role}: malformed enclave identity ({exc})") from None
    if qe.mr_signer != mrsigner:
        raise VerificationError(Layer.TCB, f"QE MRSIGNER {qe.mr_signer.hex()} is not {mrsigner.hex()}")
    if qe.isv_prod_id != prod_id:
        raise VerificationError(Layer.TCB, f"QE ISVPRODID {qe.isv_prod_id} is not {prod_id}")
    if qe.misc_select & misc_mask != misc & misc_mask:
        raise VerificationError(Layer.TCB, f"QE MISCSELECT {qe.misc_select:08x} does not match")
    if bytes(a & m for a, m in zip(qe.attributes, attr_mask, strict=False)) != bytes(
        a & m for a, m in zip(attributes, attr_mask, strict=False)
    ):
        raise VerificationError(Layer.TCB, f"QE attributes {qe.attributes.hex()} do not match")
    for level in levels:
        if qe.isv_svn >= int(level["tcb"]["isvsvn"]):
            return dict(level)
    return None


def evaluate(
    tcb_info: dict[str, Any] | None,
    pck: PckInfo,
    tee: str,
    body: SgxReportBody | TdReportBody,
    qe_identity: dict[str, Any] | None,
    qe_report: SgxReportBody,
    tcb_role: str = "tcb_info.json",
    qe_role: str = "qe_identity.json",
) -> TcbVerdict:
    """The converged TCB status; ``status`` stays None without TCB info (the QE identity is still checked)."""
    verdict = TcbVerdict()
    if tcb_info is not None:
        check_tcb_info_applies(tcb_info, pck, tee, tcb_role)
        td_body = body if isinstance(body, TdReportBody) else None
        level = platform_level(tcb_info, pck, td_body.tee_tcb_svn if td_body else None, tcb_role)
        if level is None:
            verdict.status = verdict.platform_status = NO_MATCHING_TCB_LEVEL
        else:
            verdict.status = verdict.platform_status = _status(level, tcb_role)
            verdict.tcb_date = level.get("tcbDate")
            verdict.advisory_ids = list(level.get("advisoryIDs", []))
        if td_body is not None:
            verdict.tdx_module, verdict.tdx_module_status = tdx_module_status(tcb_info, td_body, tcb_role)
            if verdict.tdx_module_status == NO_MATCHING_TCB_LEVEL:
                verdict.status = NO_MATCHING_TCB_LEVEL
            elif verdict.status != NO_MATCHING_TCB_LEVEL:
                verdict.status = converge(verdict.status, verdict.tdx_module_status)
    if qe_identity is not None:
        qe_level = qe_identity_level(qe_identity, qe_report, tee, qe_role)
        verdict.qe_status = _status(qe_level, qe_role) if qe_level is not None else REVOKED
        if qe_level is not None:
            extra = qe_level.get("advisoryIDs", [])
            verdict.advisory_ids += [a for a in extra if a not in verdict.advisory_ids]
        if verdict.status is not None and verdict.status != NO_MATCHING_TCB_LEVEL:
            verdict.status = converge(verdict.status, verdict.qe_status)
    return verdict
