"""Intel DCAP ECDSA quote verifiers: SGX (quote v3) and TDX (quote v4 and v5), fully offline.

Verification order, each step raising VerificationError with its layer:
  1. parse by declared lengths (FORMAT);
  2. PCK certificate chain from the quote (certification data type 5) up to the trusted Intel SGX Root CA,
     validity at ``now``, and the CRLs when given (CHAIN; a bad or stale CRL is COLLATERAL);
  3. QE report signed by the PCK key (SIGNATURE);
  4. QE report data = SHA-256(attestation key || QE auth data) || 32 zero bytes (KEY_BINDING);
  5. quote signed by the attestation key over header + body (SIGNATURE);
  6. TCB info and QE identity, when given: TCB Signing certificate chained to the root and valid at ``now``,
     signature over the raw inner object, issueDate..nextUpdate (COLLATERAL); QE identity match (TCB);
     then the TCB status (see ``tcb``), reported in ``tcb_status`` for the appraisal policy to judge;
  7. ``ctx.expected_report_data`` against the report data (KEY_BINDING).

Time-independent work (certificate and collateral signatures, parsing) is cached by input bytes, so a
repeat verification with the same platform and collateral costs one ECDSA verification plus parsing.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from clave.attestation.base import (
    Collateral,
    Layer,
    Roots,
    VerificationError,
    VerifiedEvidence,
    Verifier,
    VerifyContext,
)
from clave.attestation.verifiers.intel_dcap import tcb
from clave.attestation.verifiers.intel_dcap.collateral import (
    ecdsa_der,
    parse_signed_document,
    signing_candidates,
    verify_document,
)
from clave.attestation.verifiers.intel_dcap.pck import PckChain, check_crl, verify_pck_chain
from clave.attestation.verifiers.intel_dcap.quote import (
    TEE_SGX,
    TEE_TDX,
    Quote,
    SgxReportBody,
    TdReportBody,
    parse_quote,
    sniff,
)

ROOT_ANCHOR = "intel_sgx_root_ca"
TCB_SIGNING_ANCHORS = ("intel_sgx_tcb_signing_2025", "intel_sgx_tcb_signing_2018")

__all__ = ["PLUGINS", "SgxEcdsaVerifier", "TdxEcdsaVerifier", "clear_caches", "parse_quote"]


def _utc(now: dt.datetime) -> dt.datetime:
    return now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now.astimezone(dt.UTC)


@functools.lru_cache(maxsize=32)
def _anchor(directory: str, name: str) -> bytes | None:
    try:
        return Roots(directory).pem(name)
    except VerificationError:
        return None


def _root_pem(roots: Roots) -> bytes:
    pem = _anchor(str(roots.directory), ROOT_ANCHOR)
    if pem is None:
        raise VerificationError(Layer.CHAIN, f"trust anchor {ROOT_ANCHOR!r} not found in {roots.directory}")
    return pem


@functools.lru_cache(maxsize=256)
def _qe_report_signed_by(report: bytes, signature: bytes, pck: x509.Certificate) -> bool:
    key = pck.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # checked when the chain was verified
    try:
        key.verify(ecdsa_der(signature), report, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise VerificationError(Layer.SIGNATURE, "attestation key is not a valid P-256 point") from None


def clear_caches() -> None:
    """Forget every cached parse and signature check (e.g. after replacing trust anchors on disk)."""
    from clave.attestation.verifiers.intel_dcap import collateral, pck

    for cached in (
        _anchor,
        _qe_report_signed_by,
        _attestation_key,
        pck.load_pem_chain,
        pck.load_root,
        pck._verified_pck_chain,
        pck._verified_crl,
        collateral.parse_signed_document,
        collateral.signing_candidates,
        collateral._signature_ok,
    ):
        cached.cache_clear()


def verify_signatures(quote: Quote, chain: PckChain) -> None:
    """Steps 3-5: QE report by the PCK key, attestation-key binding, quote by the attestation key."""
    if not _qe_report_signed_by(quote.qe_report.raw, quote.qe_report_signature, chain.leaf):
        raise VerificationError(Layer.SIGNATURE, "QE report signature does not verify with the PCK certificate")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.report_data != binding:
        raise VerificationError(Layer.KEY_BINDING, "QE report data is not SHA-256(attestation key || QE auth data)")
    try:
        _attestation_key(quote.attestation_key).verify(
            ecdsa_der(quote.signature), quote.signed, ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise VerificationError(Layer.SIGNATURE, "quote signature does not verify with the attestation key") from None


def check_crls(collateral: Collateral, chain: PckChain, now: dt.datetime) -> None:
    root_crl = collateral.get("root_ca_crl.der")
    if root_crl is not None:
        check_crl(root_crl, chain.root, [chain.intermediate], now, "root_ca_crl.der")
    pck_crl = collateral.get("pck_crl.der")
    if pck_crl is not None:
        check_crl(pck_crl, chain.intermediate, [chain.leaf], now, "pck_crl.der")


def evaluate_tcb(
    quote: Quote, chain: PckChain, ctx: VerifyContext, now: dt.datetime, tee: str
) -> tuple[tcb.TcbVerdict, list[str]]:
    """Step 6. Returns the verdict (status None when no TCB info was given) and warnings."""
    collateral = ctx.collateral
    tcb_raw = collateral.get("tcb_info.json")
    qe_raw = collateral.get("qe_identity.json")
    warnings = []
    if tcb_raw is None:
        warnings.append("no tcb_info.json given: TCB status not evaluated")
    if qe_raw is None:
        warnings.append("no qe_identity.json given: quoting enclave identity not checked")
    if tcb_raw is None and qe_raw is None:
        return tcb.TcbVerdict(), warnings
    pems = [collateral.get(r) for r in ("tcb_info_issuer_chain.pem", "qe_identity_issuer_chain.pem")]
    pems += [_anchor(str(ctx.roots.directory), name) for name in TCB_SIGNING_ANCHORS]
    candidates = signing_candidates(tuple(p for p in pems if p is not None), chain.root)

    bodies: dict[str, dict[str, Any]] = {}
    signers = []
    for raw, key, role in ((tcb_raw, "tcbInfo", "tcb_info.json"), (qe_raw, "enclaveIdentity", "qe_identity.json")):
        if raw is not None:
            doc = parse_signed_document(raw, key, role)
            signers.append(verify_document(doc, candidates, now))
            bodies[role] = doc.body
    root_crl = collateral.get("root_ca_crl.der")
    if root_crl is not None:
        check_crl(root_crl, chain.root, signers, now, "root_ca_crl.der")
    verdict = tcb.evaluate(
        bodies.get("tcb_info.json"), chain.info, tee, quote.body, bodies.get("qe_identity.json"), quote.qe_report
    )
    return verdict, warnings


def check_report_data(report_data: bytes, expected: bytes | None) -> None:
    if expected is None:
        return
    if len(expected) > len(report_data) or report_data[: len(expected)] != expected:
        raise VerificationError(
            Layer.KEY_BINDING,
            f"report data {report_data.hex()} does not carry the expected {expected.hex()}",
        )


class _IntelDcapVerifier(Verifier):
    tee_type: ClassVar[int]
    priority = 80

    def matches(self, evidence: bytes) -> bool:
        sniffed = sniff(evidence)
        return sniffed is not None and sniffed[2] == self.tee_type

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        now = _utc(ctx.now)
        quote = parse_quote(evidence)
        if quote.header.tee_type != self.tee_type:
            other = "TDX" if quote.header.tee_type == TEE_TDX else "SGX"
            raise VerificationError(Layer.FORMAT, f"this is an {other} quote, not {self.tee.upper()}")
        chain = verify_pck_chain(quote.pck_chain_pem, _root_pem(ctx.roots), now)
        check_crls(ctx.collateral, chain, now)
        verify_signatures(quote, chain)
        verdict, warnings = evaluate_tcb(quote, chain, ctx, now, self.tee)
        check_report_data(quote.body.report_data, ctx.expected_report_data)

        claims = self.claims(quote)
        claims.update(
            quote_version=quote.header.version,
            qe_svn=quote.header.qe_svn,
            pce_svn=quote.header.pce_svn,
            fmspc=chain.info.fmspc.hex(),
            pceid=chain.info.pceid.hex(),
        )
        if verdict.status is not None:
            claims["advisory_ids"] = verdict.advisory_ids
            claims["tcb_date"] = verdict.tcb_date
        if verdict.qe_status is not None:
            claims["qe_tcb_status"] = verdict.qe_status
        if verdict.tdx_module is not None:
            claims["tdx_module"] = verdict.tdx_module
            claims["tdx_module_tcb_status"] = verdict.tdx_module_status
        return VerifiedEvidence(
            tee=self.tee,
            claims=claims,
            tcb_status=verdict.status,
            warnings=warnings,
        )

    def claims(self, quote: Quote) -> dict[str, Any]:
        raise NotImplementedError


class SgxEcdsaVerifier(_IntelDcapVerifier):
    """SGX DCAP ECDSA quotes (v3; v4/v5 with an SGX body are accepted too)."""

    name = "sgx_ecdsa"
    tee = "sgx"
    tee_type = TEE_SGX

    def claims(self, quote: Quote) -> dict[str, Any]:
        body = quote.body
        assert isinstance(body, SgxReportBody)
        return {
            "mrenclave": body.mr_enclave.hex(),
            "mrsigner": body.mr_signer.hex(),
            "isv_prodid": body.isv_prod_id,
            "isv_svn": body.isv_svn,
            "debug": body.debug,
            "report_data": body.report_data.hex(),
            "attributes": body.attributes.hex(),
            "misc_select": f"{body.misc_select:08x}",
            "cpu_svn": body.cpu_svn.hex(),
            "tee_type": "sgx",
        }


class TdxEcdsaVerifier(_IntelDcapVerifier):
    """TDX DCAP ECDSA quotes v4 and v5 (TD report 1.0 and 1.5 bodies)."""

    name = "tdx_ecdsa"
    tee = "tdx"
    tee_type = TEE_TDX

    def claims(self, quote: Quote) -> dict[str, Any]:
        body = quote.body
        assert isinstance(body, TdReportBody)
        claims: dict[str, Any] = {
            "mr_td": body.mr_td.hex(),
            **{f"rtmr{i}": rtmr.hex() for i, rtmr in enumerate(body.rtmrs)},
            "mr_seam": body.mr_seam.hex(),
            "tee_tcb_svn": body.tee_tcb_svn.hex(),
            "debug": body.debug,
            "report_data": body.report_data.hex(),
            "mr_signer_seam": body.mr_signer_seam.hex(),
            "seam_attributes": body.seam_attributes.hex(),
            "td_attributes": body.td_attributes.hex(),
            "xfam": body.xfam.hex(),
            "mr_config_id": body.mr_config_id.hex(),
            "mr_owner": body.mr_owner.hex(),
            "mr_owner_config": body.mr_owner_config.hex(),
            "tee_type": "tdx",
        }
        if body.tee_tcb_svn2 is not None and body.mr_servicetd is not None:
            claims["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
            claims["mr_servicetd"] = body.mr_servicetd.hex()
        return claims


PLUGINS = (SgxEcdsaVerifier, TdxEcdsaVerifier)
