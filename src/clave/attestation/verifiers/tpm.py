"""TPM 2.0 quote verifier.

Evidence format ("clave-tpm-quote/1"): a CBOR map, written with ``format`` as its first entry::

    {
      "format":         "clave-tpm-quote/1",
      "attest":         bstr,   # TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, exactly as TPM2_Quote returned it
      "signature":      bstr,   # TPMT_SIGNATURE over "attest" (RSASSA-PKCS1-v1_5, RSA-PSS or ECDSA)
      "ak_public":      bstr,   # TPMT_PUBLIC of the attestation key (AK) that signed it
      "pcrs":           {bank: {index: bstr}},   # PCR values, bank named "sha1", "sha256", ...
      ? "ak_certificate": bstr, # X.509 DER certificate for the AK (e.g. issued by an EK-based privacy CA)
      ? "ak_chain":     [bstr], # intermediate certificates, leaf-most first
      ? "event_log":    bstr,   # TCG event log (SHA-1 or crypto-agile format)
    }

The PCR selection is the one inside the signed TPMS_ATTEST; "pcrs" must hold a value for every selected PCR.
Verification:

1. parse TPMS_ATTEST (magic TPM_GENERATED_VALUE, type TPM_ST_ATTEST_QUOTE), TPMT_SIGNATURE and TPMT_PUBLIC;
2. the AK must be a restricted, fixedTPM signing key (only such a key guarantees that the TPM itself built
   what it signs), the signature scheme must be the AK's fixed scheme when it has one, and the signature must
   verify over the TPMS_ATTEST with the scheme's hash;
3. the quote's pcrDigest must equal the hash (with the signature's hash algorithm) of the supplied PCR values
   concatenated in selection order;
4. when an AK certificate is supplied and TPM trust anchors are configured (collateral role
   ``tpm_roots.pem``, a PEM bundle, or ``--roots`` files named ``tpm_*.pem``) it must chain to one of them
   and certify the AK's key;
5. when an event log is supplied, replaying it must give the quoted value of every quoted PCR it extends
   (in each quoted bank it has digests for);
6. the quote's extraData must equal ``qualifying_data(ctx.nonce)`` when a nonce is expected (freshness) and
   ``qualifying_data(ctx.expected_report_data)`` when report data is expected (key binding), where
   ``qualifying_data`` keeps up to 32 bytes as is and replaces longer data by its SHA-256 (the TPM caps
   qualifying data; the attester applies the same rule).

What this proves: without an endorsed AK, only that the holder of the AK's private key quoted these PCRs.
Binding the AK to the TPM's endorsement key (an EK certificate from the TPM vendor, then credential activation
or an AK certificate issued against it) is what makes it a genuine TPM; claims carry ``ak_endorsed`` and a
warning says so when that binding is missing.

Claims: ``pcrs`` (PCR index as a decimal string -> lowercase hex, for the first quoted bank), ``pcr_bank``,
``nonce`` (hex of extraData), ``ak_name``, ``ak_public_sha256``, ``ak_endorsed``, ``signature_scheme``,
``qualified_signer``, ``firmware_version`` (16 hex digits), ``clock``, ``reset_count``, ``restart_count``,
``safe``, ``pcr_banks`` (bank -> index -> hex) when more than one bank is quoted, and ``event_log_pcrs``
(the quoted PCRs the event log accounts for) when an event log is supplied.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from clave.attestation import tpm_wire as wire
from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext

_SCHEME_NAMES = {wire.ALG_RSASSA: "rsassa", wire.ALG_RSAPSS: "rsapss", wire.ALG_ECDSA: "ecdsa"}
_MAX_CHAIN_DEPTH = 6


def evidence_from_parts(attest: bytes, signature: bytes, ak_public: bytes,
                        pcrs: Mapping[int, bytes | str] | Mapping[str, bytes | str], *, bank: str | None = None,
                        ak_certificate: bytes | None = None, ak_chain: Iterable[bytes] = (),
                        event_log: bytes | None = None) -> bytes:
    """Build Clave TPM evidence from separate parts (e.g. files written by tpm2_quote or another stack).

    ``pcrs`` maps PCR index (int or decimal string) to its value (bytes or hex). ``bank`` defaults to the
    hash algorithm of the first PCR bank selected in ``attest``. ``ak_public`` may be a TPMT_PUBLIC or, as
    tpm2-tools writes it, a size-prefixed TPM2B_PUBLIC.
    """
    if len(ak_public) > 2 and int.from_bytes(ak_public[:2], "big") == len(ak_public) - 2:
        ak_public = ak_public[2:]  # TPM2B_PUBLIC: a TPMT_PUBLIC never starts with its own length
    if bank is None:
        selections = wire.parse_quote_attest(attest).pcr_selections
        if not selections:
            raise ValueError("the quote selects no PCR bank; pass bank=")
        bank = selections[0].bank
    values = {int(i): bytes.fromhex(v) if isinstance(v, str) else bytes(v) for i, v in pcrs.items()}
    return wire.TpmEvidence(attest, signature, ak_public, {bank: values}, ak_certificate, list(ak_chain),
                            event_log).encode()


class TpmVerifier(Verifier):
    name = "tpm"
    tee = "tpm"
    priority = 50

    def matches(self, evidence: bytes) -> bool:
        return wire.TpmEvidence.sniff(evidence)

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        try:
            ev = wire.TpmEvidence.decode(evidence)
            attest = wire.parse_quote_attest(ev.attest)
            signature = wire.parse_signature(ev.signature)
            ak = wire.parse_public(ev.ak_public)
            sig_hash = wire.hash_alg(signature.hash_alg)
            values = _pcr_values(ev.pcrs)
        except wire.WireError as exc:
            raise VerificationError(Layer.FORMAT, str(exc)) from None

        _check_signature(ak, signature, sig_hash, ev.attest)
        try:
            expected_digest = wire.pcr_digest(sig_hash, attest.pcr_selections, values)
        except wire.WireError as exc:
            raise VerificationError(Layer.FORMAT, str(exc)) from None
        if expected_digest != attest.pcr_digest:
            raise VerificationError(Layer.SIGNATURE, "PCR values do not match the quote's signed PCR digest "
                                    f"({expected_digest.hex()} != {attest.pcr_digest.hex()})")

        warnings: list[str] = []
        replayed = _check_event_log(ev.event_log, attest, values, warnings) if ev.event_log else None
        endorsed = False
        if ev.ak_certificate is not None:
            endorsed = _check_ak_certificate(ak, ev.ak_certificate, ev.ak_chain or [], ctx, warnings)
        else:
            warnings.append("no AK certificate: the attestation key is not bound to a genuine TPM's "
                            "endorsement key; trust rests on the AK public key alone")

        extra = attest.extra_data.hex() or "(empty)"
        if ctx.nonce is not None and attest.extra_data != wire.qualifying_data(ctx.nonce):
            raise VerificationError(Layer.FRESHNESS,
                                    f"quote extraData {extra} does not match the expected nonce")
        if ctx.expected_report_data is not None and (
            attest.extra_data != wire.qualifying_data(ctx.expected_report_data)
        ):
            raise VerificationError(Layer.KEY_BINDING,
                                    f"quote extraData {extra} does not match the expected report data")

        claims = _claims(attest, signature, ak, values, endorsed)
        if replayed is not None:
            claims["event_log_pcrs"] = replayed
        return VerifiedEvidence(tee=self.tee, claims=claims, warnings=warnings)


def _pcr_values(pcrs: Mapping[str, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
    """Bank names -> hash algorithm ids, checking each value's length."""
    values: dict[int, dict[int, bytes]] = {}
    for bank, bank_values in pcrs.items():
        alg = wire.HASH_BY_NAME.get(bank)
        if alg is None:
            raise wire.WireError(f"unknown PCR bank {bank!r}")
        for index, value in bank_values.items():
            if len(value) != alg.size:
                raise wire.WireError(f"PCR {bank}:{index} is {len(value)} bytes, expected {alg.size}")
        values[alg.alg_id] = dict(bank_values)
    return values


def _check_event_log(log_bytes: bytes, attest: wire.Attest, values: Mapping[int, Mapping[int, bytes]],
                     warnings: list[str]) -> list[int]:
    """Replay the event log in every quoted bank it has digests for; each quoted PCR the log extends must
    hold the replayed value. Returns the PCRs of the first quoted bank that the log accounts for."""
    try:
        log = wire.parse_event_log(log_bytes)
    except wire.WireError as exc:
        raise VerificationError(Layer.FORMAT, str(exc)) from None
    accounted: list[int] = []
    for position, sel in enumerate(attest.pcr_selections):
        if sel.hash_alg not in log.algorithms:
            warnings.append(f"event log has no {sel.bank} digests; it was not replayed against that bank")
            continue
        try:
            replayed = wire.replay_event_log(log, sel.hash_alg)
        except wire.WireError as exc:
            raise VerificationError(Layer.FORMAT, str(exc)) from None
        for pcr in sel.pcrs:
            if pcr in replayed and replayed[pcr] != values[sel.hash_alg][pcr]:
                raise VerificationError(Layer.SIGNATURE, f"event log does not replay to quoted PCR "
                                        f"{sel.bank}:{pcr} ({replayed[pcr].hex()})")
        if position == 0:
            accounted = [pcr for pcr in sel.pcrs if pcr in replayed]
    return accounted


def _check_signature(ak: wire.Public, signature: wire.Signature, sig_hash: wire.HashAlg,
                     signed: bytes) -> None:
    if not ak.is_restricted_signing_key:
        raise VerificationError(Layer.SIGNATURE, f"AK attributes 0x{ak.attributes:08x} are not those of a "
                                "restricted fixedTPM signing key, so its signature does not prove a quote")
    if ak.scheme != wire.ALG_NULL and (ak.scheme, ak.scheme_hash) != (signature.sig_alg, signature.hash_alg):
        raise VerificationError(Layer.SIGNATURE, f"signature scheme 0x{signature.sig_alg:04x}/"
                                f"0x{signature.hash_alg:04x} differs from the AK's fixed scheme "
                                f"0x{ak.scheme:04x}/0x{ak.scheme_hash:04x}")
    digest_alg = sig_hash.crypto_hash()
    try:
        if isinstance(ak.key, rsa.RSAPublicKey):
            if signature.sig_alg == wire.ALG_RSASSA:
                ak.key.verify(signature.rsa, signed, padding.PKCS1v15(), digest_alg)
            elif signature.sig_alg == wire.ALG_RSAPSS:
                pss = padding.PSS(mgf=padding.MGF1(digest_alg), salt_length=padding.PSS.AUTO)
                ak.key.verify(signature.rsa, signed, pss, digest_alg)
            else:
                raise VerificationError(Layer.SIGNATURE, "RSA AK with a non-RSA signature")
        else:
            if signature.sig_alg != wire.ALG_ECDSA:
                raise VerificationError(Layer.SIGNATURE, "ECC AK with a non-ECDSA signature")
            ak.key.verify(encode_dss_signature(signature.r, signature.s), signed, ec.ECDSA(digest_alg))
    except InvalidSignature:
        raise VerificationError(Layer.SIGNATURE, "quote signature does not verify with the AK") from None


def _trust_anchors(ctx: VerifyContext) -> list[x509.Certificate]:
    anchors: list[x509.Certificate] = []
    bundle = ctx.collateral.get("tpm_roots.pem")
    if bundle is not None:
        anchors += x509.load_pem_x509_certificates(bundle)
    for name in ctx.roots.names():
        if name.startswith("tpm_"):
            anchors += x509.load_pem_x509_certificates(ctx.roots.pem(name))
    return anchors


def _check_ak_certificate(ak: wire.Public, cert_der: bytes, chain_der: list[bytes], ctx: VerifyContext,
                          warnings: list[str]) -> bool:
    """Check the AK certificate and its chain; True when it chains to a configured TPM trust anchor."""
    try:
        leaf = x509.load_der_x509_certificate(cert_der)
        intermediates = [x509.load_der_x509_certificate(c) for c in chain_der]
    except ValueError as exc:
        raise VerificationError(Layer.FORMAT, f"AK certificate is not DER X.509: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, spki) != ak.key.public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise VerificationError(Layer.CHAIN, "AK certificate certifies a different key than the quote's AK")
    try:
        anchors = _trust_anchors(ctx)
    except ValueError as exc:
        raise VerificationError(Layer.CHAIN, f"TPM trust anchors are not PEM certificates: {exc}") from None
    if not anchors:
        warnings.append("AK certificate supplied but no TPM trust anchor configured (collateral "
                        "tpm_roots.pem or roots tpm_*.pem): the AK is not endorsed")
        return False

    current = leaf
    for _ in range(_MAX_CHAIN_DEPTH):
        _check_validity(current, ctx)
        for anchor in anchors:
            if _issued_by(current, anchor):
                _check_validity(anchor, ctx)
                return True
        issuer = next((c for c in intermediates if c is not current and _issued_by(current, c)), None)
        if issuer is None:
            break
        constraints = _basic_constraints(issuer)
        if constraints is None or not constraints.ca:
            raise VerificationError(Layer.CHAIN,
                                    f"intermediate {issuer.subject.rfc4514_string()} is not a CA")
        current = issuer
    raise VerificationError(Layer.CHAIN, f"AK certificate issued by {current.issuer.rfc4514_string()} "
                            "does not chain to a configured TPM trust anchor")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_validity(cert: x509.Certificate, ctx: VerifyContext) -> None:
    now = ctx.now if ctx.now.tzinfo else ctx.now.replace(tzinfo=dt.UTC)  # naive times are UTC
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerificationError(Layer.CHAIN, f"certificate {cert.subject.rfc4514_string()} is not valid at "
                                f"{now.isoformat()} (valid {cert.not_valid_before_utc.isoformat()} to "
                                f"{cert.not_valid_after_utc.isoformat()})")


def _claims(attest: wire.Attest, signature: wire.Signature, ak: wire.Public,
            values: Mapping[int, Mapping[int, bytes]], endorsed: bool) -> dict[str, object]:
    banks = {sel.bank: {str(i): values[sel.hash_alg][i].hex() for i in sel.pcrs}
             for sel in attest.pcr_selections}
    first_bank = attest.pcr_selections[0].bank if attest.pcr_selections else None
    claims: dict[str, object] = {
        "pcrs": banks.get(first_bank, {}) if first_bank else {},
        "pcr_bank": first_bank,
        "nonce": attest.extra_data.hex(),
        "ak_name": ak.name().hex(),
        "ak_public_sha256": hashlib.sha256(ak.raw).hexdigest(),
        "ak_endorsed": endorsed,
        "signature_scheme": f"{_SCHEME_NAMES[signature.sig_alg]}-{wire.hash_alg(signature.hash_alg).name}",
        "qualified_signer": attest.qualified_signer.hex(),
        "firmware_version": f"{attest.firmware_version:016x}",
        "clock": attest.clock,
        "reset_count": attest.reset_count,
        "restart_count": attest.restart_count,
        "safe": attest.safe,
    }
    if len(banks) > 1:
        claims["pcr_banks"] = banks
    return claims


PLUGINS = (TpmVerifier,)
