"""Intel DCAP verifiers (SGX quote v3, TDX quote v4/v5) over the genuine samples, their mutations, and a
test PKI (root overridden with ``Roots``) for what Intel's keys cannot produce: revoked certificates and
TCB levels with every status."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from helpers import flip  # noqa: E402

from clave.attestation.attesters import sgx as sgx_attester
from clave.attestation.attesters import tdx as tdx_attester
from clave.attestation.base import (
    AttesterUnavailable,
    Collateral,
    Layer,
    Roots,
    VerificationError,
    VerifyContext,
)
from clave.attestation.verifiers import intel_dcap
from clave.attestation.verifiers.intel_dcap import SgxEcdsaVerifier, TdxEcdsaVerifier, parse_quote
from clave.attestation.verifiers.intel_dcap.pck import SGX_EXTENSION_OID

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "attestation"
pytestmark = pytest.mark.skipif(not (DATA / "sgx").is_dir(), reason=f"attestation test data absent: {DATA}")

# manifest file role -> collateral role (the --collateral DIR file name)
ROLES = {
    "tcb_info": "tcb_info.json",
    "qe_identity": "qe_identity.json",
    "root_ca_crl": "root_ca_crl.der",
    "pck_crl": "pck_crl.der",
    "tcb_signing_chain": "tcb_info_issuer_chain.pem",
    "qe_identity_signing_chain": "qe_identity_issuer_chain.pem",
    "pck_crl_issuer_chain": "pck_crl_issuer_chain.pem",
}
VERIFIERS = {"sgx": SgxEcdsaVerifier, "tdx": TdxEcdsaVerifier}


def _samples() -> list[tuple[str, dict[str, Any]]]:
    if not (DATA / "sgx").is_dir():
        return []
    return [(tee, s) for tee in ("sgx", "tdx") for s in json.loads((DATA / tee / "manifest.json").read_text())]


SAMPLES = _samples()
BY_NAME = {s["name"]: (tee, s) for tee, s in SAMPLES}


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def quote_of(name: str) -> bytes:
    tee, sample = BY_NAME[name]
    return (DATA / tee / sample["files"]["quote"]).read_bytes()


def collateral_of(name: str, **replace: bytes | None) -> Collateral:
    tee, sample = BY_NAME[name]
    collateral = Collateral()
    for role, file in sample["files"].items():
        if role in ROLES:
            collateral.set(ROLES[role], (DATA / tee / file).read_bytes())
    for role, data in replace.items():
        role = role.replace("__", ".")
        if data is None:
            collateral._items.pop(role, None)
        else:
            collateral.set(role, data)
    return collateral


def context(name: str, now: dt.datetime | None = None, **kwargs: Any) -> VerifyContext:
    _, sample = BY_NAME[name]
    kwargs.setdefault("collateral", collateral_of(name))
    return VerifyContext(now=now or _time(sample["validity"]["suggested_now"]), **kwargs)


def verify(name: str, data: bytes | None = None, **kwargs: Any) -> Any:
    tee, _ = BY_NAME[name]
    return VERIFIERS[tee]().verify(quote_of(name) if data is None else data, context(name, **kwargs))


def rejected(name: str, data: bytes | None = None, **kwargs: Any) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify(name, data, **kwargs)
    return info.value




# ---------------------------------------------------------------- every sample, expected values

SGX_CLAIMS = {
    "mrenclave": "mr_enclave",
    "mrsigner": "mr_signer",
    "isv_prodid": "isv_prod_id",
    "isv_svn": "isv_svn",
    "report_data": "report_data",
    "attributes": "attributes",
    "cpu_svn": "cpu_svn",
}
TDX_CLAIMS = {
    key: key
    for key in (
        "mr_td",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "mr_seam",
        "tee_tcb_svn",
        "report_data",
        "mr_signer_seam",
        "seam_attributes",
        "td_attributes",
        "xfam",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
    )
}
NOT_HEX = {"tcb_date", "qe_tcb_status", "tdx_module", "tdx_module_tcb_status", "tee_type"}
STATUS_NAMES = {"NO_MATCHING_TCB_LEVEL": "NoMatchingTcbLevel"}


@pytest.mark.parametrize(("tee", "sample"), SAMPLES, ids=[s["name"] for _, s in SAMPLES])
def test_sample_verifies_to_manifest_values(tee: str, sample: dict[str, Any]) -> None:
    result = verify(sample["name"])
    expected = sample["expected"]
    assert result.tee == tee
    for claim, field in (SGX_CLAIMS if tee == "sgx" else TDX_CLAIMS).items():
        assert result.claims[claim] == expected["body"][field], claim
    assert result.claims["debug"] is False
    assert result.claims["fmspc"] == expected["pck"]["fmspc"]
    assert result.claims["quote_version"] == expected["quote_version"]
    assert result.claims["qe_svn"] == expected["qe_svn"] and result.claims["pce_svn"] == expected["pce_svn"]
    hex_claims = [v for k, v in result.claims.items() if isinstance(v, str) and k not in NOT_HEX]
    assert all(v == v.lower() for v in hex_claims)

    qvl: dict[str, Any] = (sample.get("helper_tcb_evaluation") or {}).get("intel_qvl_rule") or {}
    if "tcb_info" not in sample["files"]:
        assert result.tcb_status is None
        assert any("tcb_info.json" in w for w in result.warnings)
        return
    # The samples' QE and TDX module levels are all UpToDate, so the converged status is the platform's.
    assert qvl["qe_identity_tcb"] in (None, "UpToDate")
    assert (qvl["tdx_module"] or [None, None])[1] in (None, "UpToDate")
    status = qvl["platform_tcb_level"]
    assert result.tcb_status == STATUS_NAMES.get(status, status)
    if qvl["advisoryIDs"] is not None:
        assert result.claims["advisory_ids"] == qvl["advisoryIDs"]
    upstream = sample.get("upstream_expectations") or {}
    if "tcb_status" in upstream:
        assert result.tcb_status == upstream["tcb_status"]
    if tee == "tdx":
        assert result.claims.get("tdx_module") == (qvl["tdx_module"] or [None])[0]


def test_tdx_matching_follows_intel_qvl_rule() -> None:
    # TEE_TCB_SVN 04 01 07..: Intel QVL skips bytes 0-1 (module judged by TDX_01's identity) -> UpToDate;
    # comparing all 16 bytes (dcap-qvl) would give OutOfDate.
    _, sample = BY_NAME["gotdx_gcp_cos113_v4_00806f050000"]
    helper = sample["helper_tcb_evaluation"]
    assert helper["compare_all_16_tee_tcb_svn"]["platform_tcb_level"] == "OutOfDate"
    result = verify("gotdx_gcp_cos113_v4_00806f050000")
    assert result.tcb_status == "UpToDate"
    assert result.claims["tdx_module"] == "TDX_01" and result.claims["tdx_module_tcb_status"] == "UpToDate"


def test_v5_td15_body_claims() -> None:
    result = verify("gotdx_v5_90c06f000000")
    assert result.claims["tee_tcb_svn2"] == "0d010400000000000000000000000000"
    assert result.claims["mr_servicetd"] == "00" * 48


def test_sniffing_and_plugins() -> None:
    assert [c.name for c in intel_dcap.PLUGINS] == ["sgx_ecdsa", "tdx_ecdsa"]
    assert [c.tee for c in intel_dcap.PLUGINS] == ["sgx", "tdx"]
    for tee, sample in SAMPLES:
        data = (DATA / tee / sample["files"]["quote"]).read_bytes()
        assert SgxEcdsaVerifier().matches(data) is (tee == "sgx")
        assert TdxEcdsaVerifier().matches(data) is (tee == "tdx")
    assert not SgxEcdsaVerifier().matches(b"\x03\x00\x02\x00")
    assert not TdxEcdsaVerifier().matches(b"{}" * 40)


def test_wrong_verifier_is_a_format_error() -> None:
    with pytest.raises(VerificationError) as info:
        SgxEcdsaVerifier().verify(quote_of("dcapqvl_v4_b0c06f000000"), context("dcapqvl_v4_b0c06f000000"))
    assert info.value.layer is Layer.FORMAT


def test_tdx_zero_padding_is_ignored_and_may_be_stripped_or_extended() -> None:
    data = quote_of("dcapqvl_v4_b0c06f000000")
    quote = parse_quote(data)
    assert quote.trailing == 70
    verify("dcapqvl_v4_b0c06f000000", data[: len(data) - quote.trailing])
    verify("dcapqvl_v4_b0c06f000000", data + bytes(1000))


# ---------------------------------------------------------------- mutations of the signed regions


def _regions(data: bytes) -> dict[str, tuple[int, Layer]]:
    """Offset of one byte inside each signed region, and the layer that must reject a flip there."""
    q = parse_quote(data)
    body_start = len(q.signed) - len(q.body.raw)
    qe_report = data.index(q.qe_report.raw)
    qe_sig = data.index(q.qe_report_signature, qe_report)
    return {
        "header user data": (40, Layer.SIGNATURE),
        "header version": (0, Layer.FORMAT),
        "report body": (body_start + 100, Layer.SIGNATURE),
        "report data": (len(q.signed) - 1, Layer.SIGNATURE),
        "quote signature": (len(q.signed) + 4 + 10, Layer.SIGNATURE),
        "attestation key": (len(q.signed) + 4 + 64 + 5, Layer.KEY_BINDING),
        "QE report": (qe_report + 64, Layer.SIGNATURE),
        "QE report data": (qe_report + 320, Layer.SIGNATURE),
        "QE report signature": (qe_sig + 40, Layer.SIGNATURE),
        "QE auth data": (qe_sig + 64 + 2, Layer.KEY_BINDING),
    }


MUTATED = ["dcapqvl_00a067110000", "dcapqvl_v4_b0c06f000000", "dcapqvl_v5_90c06f000000_outdated"]


@pytest.mark.parametrize("name", MUTATED)
@pytest.mark.parametrize("region", list(_regions(quote_of(MUTATED[0])) if SAMPLES else []))
def test_flipped_bit_is_rejected_by_its_layer(name: str, region: str) -> None:
    offset, layer = _regions(quote_of(name))[region]
    for bit in (0, 7):
        error = rejected(name, flip(quote_of(name), offset, bit))
        assert error.layer is layer, f"{region}: {error}"


@pytest.mark.parametrize("name", MUTATED)
def test_truncated_quote_is_a_format_error(name: str) -> None:
    data = quote_of(name)
    q = parse_quote(data)
    end = len(data) - q.trailing
    for cut in (0, 20, 47, 100, len(q.signed), len(q.signed) + 3, len(q.signed) + 200, end - 1000, end - 1):
        error = rejected(name, data[:cut])
        assert error.layer is Layer.FORMAT, f"cut at {cut}: {error}"
        assert str(error).startswith("evidence format: ")


# ---------------------------------------------------------------- the PCK chain


def with_chain(data: bytes, chain: bytes) -> bytes:
    """The quote with its PCK chain replaced, every enclosing length fixed up."""
    q = parse_quote(data)
    start = data.index(q.pck_chain_pem)
    delta = len(chain) - len(q.pck_chain_pem)
    out = bytearray(data[:start] + chain + data[start + len(q.pck_chain_pem) :])

    def bump(at: int) -> None:
        out[at : at + 4] = (int.from_bytes(out[at : at + 4], "little") + delta).to_bytes(4, "little")

    bump(len(q.signed))  # signature data length
    bump(start - 4)  # type-5 certification data size
    if q.header.version >= 4:
        bump(len(q.signed) + 4 + 128 + 2)  # type-6 (QE report) certification data size
    return bytes(out)


def _pems(data: bytes) -> list[bytes]:
    certs = x509.load_pem_x509_certificates(parse_quote(data).pck_chain_pem.rstrip(b"\x00"))
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def test_rebuilt_quote_with_the_same_chain_still_verifies() -> None:
    data = quote_of("dcapqvl_v4_b0c06f000000")
    verify("dcapqvl_v4_b0c06f000000", with_chain(data, b"".join(_pems(data))))


@pytest.mark.parametrize("name", ["dcapqvl_00a067110000", "dcapqvl_v4_b0c06f000000"])
def test_wrong_or_truncated_chain_is_rejected(name: str) -> None:
    data = quote_of(name)
    leaf, intermediate, root = _pems(data)
    processor_ca = (DATA / "roots" / "intel_sgx_pck_processor_ca.pem").read_bytes()
    platform_ca = (DATA / "roots" / "intel_sgx_pck_platform_ca.pem").read_bytes()
    other_ca = platform_ca if intermediate.strip() == processor_ca.strip() else processor_ca
    fake_root = _test_pki().root_pem
    cases = {
        "leaf only": leaf,
        "wrong PCK CA": leaf + other_ca + root,
        "foreign root": leaf + intermediate + fake_root,
        "cut in the leaf": (leaf + intermediate + root)[: len(leaf) // 2],
        "empty": b"",
    }
    for case, chain in cases.items():
        error = rejected(name, with_chain(data, chain))
        assert error.layer is Layer.CHAIN, f"{case}: {error}"
    # A genuine chain of another platform: the chain itself is fine, the QE report signature is not.
    donor = quote_of("tlsn_quote9_00906ed50000" if "00a0" in name else "dcapqvl_tappd_v4_b0c06f000000")
    error = rejected(name, with_chain(data, parse_quote(donor).pck_chain_pem))
    assert error.layer is Layer.SIGNATURE


def test_untrusted_root_directory_is_rejected(tmp_path: Path) -> None:
    shutil.copy(DATA / "roots" / "amd_milan_ark.pem", tmp_path / "intel_sgx_root_ca.pem")
    error = rejected("dcapqvl_00a067110000", roots=Roots(tmp_path))
    assert error.layer is Layer.CHAIN


def test_expired_pck_certificate() -> None:
    leaf = x509.load_pem_x509_certificate(_pems(quote_of("occlum_30606a000000"))[0])
    error = rejected("occlum_30606a000000", now=leaf.not_valid_after_utc + dt.timedelta(seconds=1))
    assert error.layer is Layer.CHAIN and "not at" in str(error)
    error = rejected("occlum_30606a000000", now=leaf.not_valid_before_utc - dt.timedelta(seconds=1))
    assert error.layer is Layer.CHAIN


# ---------------------------------------------------------------- collateral


@pytest.mark.parametrize(
    "name",
    ["dcapqvl_00a067110000", "dcapqvl_v4_b0c06f000000", "tlsn_quote9_00906ed50000", "gotdx_v5_90c06f000000"],
)
def test_expired_collateral_is_rejected(name: str) -> None:
    _, sample = BY_NAME[name]
    not_after = _time(sample["validity"]["collateral"][1])
    error = rejected(name, now=not_after + dt.timedelta(seconds=1))
    assert error.layer is Layer.COLLATERAL, str(error)
    not_before = _time(sample["validity"]["collateral"][0])
    assert rejected(name, now=not_before - dt.timedelta(seconds=1)).layer is Layer.COLLATERAL
    verify(name, now=not_after)  # the window is inclusive


def _tamper_json(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert old in raw
    return raw.replace(old, new, 1)


def test_tampered_collateral_is_rejected() -> None:
    name = "dcapqvl_00a067110000"
    c = collateral_of(name)
    tcb_info, qe_identity = c.get("tcb_info.json"), c.get("qe_identity.json")
    pck_crl, root_crl = c.get("pck_crl.der"), c.get("root_ca_crl.der")
    assert tcb_info and qe_identity and pck_crl and root_crl
    cases: dict[str, dict[str, bytes | None]] = {
        "tcb_info status": dict(tcb_info__json=_tamper_json(tcb_info, b'"OutOfDate"', b'"UpToDate"')),
        "tcb_info signature": dict(tcb_info__json=_tamper_json(tcb_info, b'"signature":"', b'"signature":"00')),
        "tcb_info not JSON": dict(tcb_info__json=tcb_info[:100]),
        "qe_identity isvsvn": dict(qe_identity__json=_tamper_json(qe_identity, b'"isvsvn":8', b'"isvsvn":1')),
        "pck_crl signature": dict(pck_crl__der=flip(pck_crl, len(pck_crl) - 3)),
        "pck_crl from the root": dict(pck_crl__der=root_crl),
        "root_ca_crl garbage": dict(root_ca_crl__der=b"\x30\x03\x02\x01\x00"),
        "other platform's tcb_info": dict(
            tcb_info__json=collateral_of("tlsn_quote9_00906ed50000").get("tcb_info.json")
        ),
        "TDX tcb_info for SGX": dict(tcb_info__json=collateral_of("dcapqvl_v4_b0c06f000000").get("tcb_info.json")),
        "TD_QE identity for SGX": dict(
            qe_identity__json=collateral_of("dcapqvl_v4_b0c06f000000").get("qe_identity.json")
        ),
    }
    for case, replace in cases.items():
        error = rejected(name, collateral=collateral_of(name, **replace))
        assert error.layer is Layer.COLLATERAL, f"{case}: {error}"


def test_tcb_signing_certificate_is_picked_by_time() -> None:
    # 2023: only the 2018 TCB Signing certificate is valid; without the issuer chain in the collateral the
    # packaged copy is found; the 2025 one (same key) is ignored until it becomes valid.
    name = "gotdx_spr_e4_v4_50806f000000"
    result = verify(name, collateral=collateral_of(name, tcb_info_issuer_chain__pem=None))
    assert result.tcb_status == "NoMatchingTcbLevel"
    # 2025-06: the 2018 certificate has expired, the 2025 one signs (dcapqvl's chain carries it).
    assert verify("dcapqvl_00a067110000").tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_qe_identity_of_the_wrong_enclave_kind_is_refused() -> None:
    name = "dcapqvl_v4_b0c06f000000"
    # The SGX QE identity document is genuinely signed but names id "QE": refused as the wrong collateral.
    sgx_identity = collateral_of("dcapqvl_00a067110000").get("qe_identity.json")
    error = rejected(name, collateral=collateral_of(name, qe_identity__json=sgx_identity))
    assert error.layer is Layer.COLLATERAL


def test_qe_identity_is_checked_without_tcb_info() -> None:
    name = "dcapqvl_00a067110000"
    result = verify(name, collateral=collateral_of(name, tcb_info__json=None))
    assert result.tcb_status is None and result.claims["qe_tcb_status"] == "UpToDate"
    td_qe = collateral_of("dcapqvl_v4_b0c06f000000").get("qe_identity.json")
    error = rejected(name, collateral=collateral_of(name, tcb_info__json=None, qe_identity__json=td_qe))
    assert error.layer is Layer.COLLATERAL


# ---------------------------------------------------------------- report data binding


def test_report_data_binding() -> None:
    name = "dcapqvl_00a067110000"
    assert verify(name, expected_report_data=b"Hello, world!").claims["report_data"].startswith("48656c6c6f")
    full = bytes.fromhex(BY_NAME[name][1]["expected"]["body"]["report_data"])
    verify(name, expected_report_data=full)
    for wrong in (b"Hello, World!", full[:-1] + b"\x01", full + b"\x00", hashlib.sha256(b"key").digest()):
        assert rejected(name, expected_report_data=wrong).layer is Layer.KEY_BINDING
    assert rejected("dcapqvl_v4_b0c06f000000", expected_report_data=b"\x00" * 32).layer is Layer.KEY_BINDING


# ---------------------------------------------------------------- caching


def test_repeat_verification_hits_the_caches() -> None:
    from clave.attestation.verifiers.intel_dcap import collateral, pck

    name = "dcapqvl_v4_b0c06f000000"
    verify(name)
    chain_hits = pck._verified_pck_chain.cache_info().hits
    doc_hits = collateral.parse_signed_document.cache_info().hits
    verify(name, now=_time(BY_NAME[name][1]["validity"]["suggested_now"]) + dt.timedelta(minutes=5))
    assert pck._verified_pck_chain.cache_info().hits == chain_hits + 1
    assert collateral.parse_signed_document.cache_info().hits == doc_hits + 2


# ---------------------------------------------------------------- a test PKI: revocation and TCB statuses


class _TestPki:
    """A root, PCK CA, PCK leaf (carrying a real SGX extension) and TCB Signing cert, all test keys."""

    def __init__(self, sgx_extension: bytes) -> None:
        self.now = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.pck_key = ec.generate_private_key(ec.SECP256R1())
        self.signing_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert("Intel SGX Root CA", self.root_key, "Intel SGX Root CA", self.root_key, ca=True)
        self.ca = self._cert("Intel SGX PCK Platform CA", self.ca_key, "Intel SGX Root CA", self.root_key, ca=True)
        ext = x509.UnrecognizedExtension(SGX_EXTENSION_OID, sgx_extension)
        self.pck = self._cert(
            "Intel SGX PCK Certificate", self.pck_key, "Intel SGX PCK Platform CA", self.ca_key, extra=ext
        )
        self.signing = self._cert("Intel SGX TCB Signing", self.signing_key, "Intel SGX Root CA", self.root_key)
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM)

    def _cert(
        self,
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        issuer_key: ec.EllipticCurvePrivateKey,
        ca: bool = False,
        extra: x509.ExtensionType | None = None,
    ) -> x509.Certificate:
        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(days=30))
            .not_valid_after(self.now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if extra is not None:
            builder = builder.add_extension(extra, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def crl(self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[x509.Certificate]) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(self.now - dt.timedelta(days=1))
            .next_update(self.now + dt.timedelta(days=30))
        )
        for cert in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(self.now - dt.timedelta(days=2))
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def sign_document(self, key: str, body: dict[str, Any]) -> bytes:
        inner = json.dumps(body, separators=(",", ":")).encode()
        r, s = decode_dss_signature(self.signing_key.sign(inner, ec.ECDSA(hashes.SHA256())))
        signature = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
        return b'{"' + key.encode() + b'":' + inner + b',"signature":"' + signature.encode() + b'"}'

    def requote(self, genuine: bytes) -> bytes:
        """The genuine quote's header, body and QE report, re-certified by this PKI."""
        q = parse_quote(genuine)
        att_key = ec.generate_private_key(ec.SECP256R1())
        att_pub = att_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        auth = bytes(range(32))
        qe_report = q.qe_report.raw[:320] + hashlib.sha256(att_pub + auth).digest() + bytes(32)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.pck, self.ca, self.root))
        cert_data = (5).to_bytes(2, "little") + len(chain).to_bytes(4, "little") + chain
        qe_part = qe_report + _raw_sig(self.pck_key, qe_report) + len(auth).to_bytes(2, "little") + auth
        if q.header.version == 3:
            tail = qe_part + cert_data
        else:
            inner = qe_part + cert_data
            tail = (6).to_bytes(2, "little") + len(inner).to_bytes(4, "little") + inner
        sig_data = _raw_sig(att_key, q.signed) + att_pub + tail
        return q.signed + len(sig_data).to_bytes(4, "little") + sig_data


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


_PKI: list[_TestPki] = []


def _test_pki() -> _TestPki:
    if not _PKI:
        pck = x509.load_pem_x509_certificate(_pems(quote_of("dcapqvl_v4_b0c06f000000"))[0])
        ext = pck.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
        _PKI.append(_TestPki(ext.value))  # type: ignore[attr-defined]
    return _PKI[0]


@pytest.fixture()
def pki_roots(tmp_path: Path) -> Roots:
    (tmp_path / "intel_sgx_root_ca.pem").write_bytes(_test_pki().root_pem)
    return Roots(tmp_path)


def _pki_verify(genuine: str, roots: Roots, **collateral: bytes) -> Any:
    pki = _test_pki()
    tee, _ = BY_NAME[genuine]
    signing_chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pki.signing, pki.root))
    collateral.setdefault("tcb_info_issuer_chain__pem", signing_chain)
    ctx = VerifyContext(now=pki.now, collateral=Collateral(None, **collateral), roots=roots)
    return VERIFIERS[tee]().verify(pki.requote(quote_of(genuine)), ctx)


def test_test_pki_quote_verifies(pki_roots: Roots) -> None:
    result = _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots)
    assert result.claims["mr_td"] == BY_NAME["dcapqvl_v4_b0c06f000000"][1]["expected"]["body"]["mr_td"]
    # ...and Intel's root does not accept it.
    with pytest.raises(VerificationError) as info:
        _pki_verify("dcapqvl_v4_b0c06f000000", Roots())
    assert info.value.layer is Layer.CHAIN


def test_revoked_certificates_are_rejected(pki_roots: Roots) -> None:
    pki = _test_pki()
    clean_pck_crl = pki.crl(pki.ca, pki.ca_key, [])
    clean_root_crl = pki.crl(pki.root, pki.root_key, [])
    _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots, pck_crl__der=clean_pck_crl, root_ca_crl__der=clean_root_crl)
    cases = {
        "PCK": dict(pck_crl__der=pki.crl(pki.ca, pki.ca_key, [pki.pck])),
        "PCK CA": dict(root_ca_crl__der=pki.crl(pki.root, pki.root_key, [pki.ca])),
    }
    for case, collateral in cases.items():
        with pytest.raises(VerificationError) as info:
            _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots, **collateral)
        assert info.value.layer is Layer.CHAIN and "revoked" in str(info.value), case


def _tdx_tcb_info(sgx: list[int], pcesvn: int, tdx: list[int], status: str, module_status: str) -> dict[str, Any]:
    def comps(svns: list[int]) -> list[dict[str, int]]:
        return [{"svn": v} for v in svns + [0] * (16 - len(svns))]

    return {
        "id": "TDX",
        "version": 3,
        "issueDate": "2025-05-01T00:00:00Z",
        "nextUpdate": "2025-07-01T00:00:00Z",
        "fmspc": "B0C06F000000",
        "pceId": "0000",
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
        "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8},
        "tdxModuleIdentities": [
            {
                "id": "TDX_01",
                "mrsigner": "00" * 48,
                "attributes": "00" * 8,
                "attributesMask": "FF" * 8,
                "tcbLevels": [{"tcb": {"isvsvn": 2}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": module_status}],
            }
        ],
        "tcbLevels": [
            {
                "tcb": {"sgxtcbcomponents": comps(sgx), "pcesvn": pcesvn, "tdxtcbcomponents": comps(tdx)},
                "tcbDate": "2024-03-13T00:00:00Z",
                "tcbStatus": status,
                "advisoryIDs": ["INTEL-SA-00000"],
            }
        ],
    }


@pytest.mark.parametrize(
    ("status", "module_status", "expected"),
    [
        ("UpToDate", "UpToDate", "UpToDate"),
        ("Revoked", "UpToDate", "Revoked"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("UpToDate", "Revoked", "Revoked"),
    ],
)
def test_tcb_statuses_from_signed_tcb_info(pki_roots: Roots, status: str, module_status: str, expected: str) -> None:
    pki = _test_pki()
    # PCK of dcapqvl_v4: SGX comps 3,3,2,2,4,1,0,5 / PCESVN 11; its TEE_TCB_SVN is 06 01 03.
    body = _tdx_tcb_info([3, 3, 2, 2, 4, 1, 0, 5], 11, [99, 99, 3], status, module_status)
    tcb_info = pki.sign_document("tcbInfo", body)
    result = _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots, tcb_info__json=tcb_info)
    assert result.tcb_status == expected
    assert result.claims["advisory_ids"] == ["INTEL-SA-00000"]


def test_no_matching_tcb_level(pki_roots: Roots) -> None:
    pki = _test_pki()
    for sgx, pcesvn, tdx in (
        ([4, 3, 2, 2, 4, 1, 0, 5], 11, [0, 0, 3]),
        ([3] * 2, 12, [0]),
        ([3], 11, [0, 0, 4]),
    ):
        tcb_info = pki.sign_document("tcbInfo", _tdx_tcb_info(sgx, pcesvn, tdx, "UpToDate", "UpToDate"))
        result = _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots, tcb_info__json=tcb_info)
        assert result.tcb_status == "NoMatchingTcbLevel", (sgx, pcesvn, tdx)


def test_qe_identity_statuses(pki_roots: Roots) -> None:
    pki = _test_pki()
    tcb_info = pki.sign_document("tcbInfo", _tdx_tcb_info([3], 11, [0, 0, 3], "UpToDate", "UpToDate"))
    genuine = json.loads(collateral_of("dcapqvl_v4_b0c06f000000").get("qe_identity.json") or b"")
    identity = genuine["enclaveIdentity"]
    identity["issueDate"], identity["nextUpdate"] = "2025-05-01T00:00:00Z", "2025-07-01T00:00:00Z"
    for min_svn, expected in ((6, "UpToDate"), (7, "Revoked")):  # the QE's ISVSVN is 6
        identity["tcbLevels"] = [
            {"tcb": {"isvsvn": min_svn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
        ]
        qe_identity = pki.sign_document("enclaveIdentity", identity)
        result = _pki_verify(
            "dcapqvl_v4_b0c06f000000", pki_roots, tcb_info__json=tcb_info, qe_identity__json=qe_identity
        )
        assert result.tcb_status == expected
    identity["tcbLevels"][0]["tcb"]["isvsvn"] = 1
    identity["tcbLevels"][0]["tcbStatus"] = "OutOfDate"
    qe_identity = pki.sign_document("enclaveIdentity", identity)
    result = _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots, tcb_info__json=tcb_info, qe_identity__json=qe_identity)
    assert result.tcb_status == "OutOfDate" and result.claims["qe_tcb_status"] == "OutOfDate"
    identity["mrsigner"] = "00" * 32
    qe_identity = pki.sign_document("enclaveIdentity", identity)
    with pytest.raises(VerificationError) as info:
        _pki_verify("dcapqvl_v4_b0c06f000000", pki_roots, tcb_info__json=tcb_info, qe_identity__json=qe_identity)
    assert info.value.layer is Layer.TCB


# ---------------------------------------------------------------- attesters (no TEE on this host)


def test_tdx_attester_unavailable_without_device() -> None:
    if Path("/dev/tdx_guest").exists() or Path("/sys/kernel/config/tsm/report").is_dir():
        pytest.skip("this host has a TDX guest interface")
    attester = tdx_attester.TdxAttester()
    with pytest.raises(AttesterUnavailable, match="tdx_guest"):
        attester.available()
    with pytest.raises(AttesterUnavailable):
        attester.attest(b"\x00" * 64)
    assert [c.name for c in tdx_attester.PLUGINS] == ["tdx_ecdsa"]


def test_sgx_attester_unavailable_without_device() -> None:
    if Path("/dev/sgx_enclave").exists() or Path("/dev/attestation/quote").exists():
        pytest.skip("this host has an SGX interface")
    attester = sgx_attester.SgxAttester()
    with pytest.raises(AttesterUnavailable, match="sgx_enclave"):
        attester.available()
    with pytest.raises(AttesterUnavailable):
        attester.attest(b"\x00" * 64)
    assert [c.name for c in sgx_attester.PLUGINS] == ["sgx_ecdsa"]


def test_tdx_attester_names_what_is_missing(tmp_path: Path) -> None:
    if tdx_attester._cpu_flag("tdx_guest"):
        pytest.skip("this host is a TDX guest")
    device = tmp_path / "tdx_guest"
    with pytest.raises(AttesterUnavailable, match="not a TDX guest"):
        tdx_attester.TdxAttester(tsm_root=tmp_path, device=device).available()
    device.touch()
    with pytest.raises(AttesterUnavailable, match="configfs-tsm .* is missing"):
        tdx_attester.TdxAttester(tsm_root=tmp_path / "absent", device=device).available()


def test_sgx_attester_names_what_is_missing(tmp_path: Path) -> None:
    device = tmp_path / "sgx_enclave"
    device.touch()
    with pytest.raises(AttesterUnavailable, match="not inside an SGX enclave"):
        sgx_attester.SgxAttester(attestation_dir=tmp_path / "attestation", device=device).available()
    (tmp_path / "quote").touch()
    (tmp_path / "attestation_type").write_text("epid\n")
    with pytest.raises(AttesterUnavailable, match="'epid', not 'dcap'"):
        sgx_attester.SgxAttester(attestation_dir=tmp_path, device=device).available()


def test_attesters_refuse_oversized_report_data() -> None:
    for attester in (tdx_attester.TdxAttester(), sgx_attester.SgxAttester()):
        with pytest.raises(ValueError, match="64"):
            attester.attest(b"\x00" * 65)
