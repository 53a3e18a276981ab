"""AMD SEV-SNP: genuine reports verify to the manifest's values; tampered ones fail at the right layer."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from helpers import flip  # noqa: E402

from clave.attestation.attesters.snp import SnpAttester
from clave.attestation.base import (
    AttesterUnavailable,
    Collateral,
    Layer,
    Roots,
    VerificationError,
    VerifyContext,
)
from clave.attestation.verifiers.amd_snp import PLUGINS, SnpVerifier, parse_report

DATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "attestation"
SNP = DATA / "sev-snp"
ROOTS = DATA / "roots"

pytestmark = pytest.mark.skipif(not SNP.is_dir(), reason=f"shared SEV-SNP test data absent at {SNP}")

# Manifest file roles -> collateral roles the verifier reads.
COLLATERAL_ROLES = {"vcek": "vcek.der", "vlek": "vlek.der", "ask": "ask.pem", "ask_ark_chain": "ask_ark.pem"}


def _samples() -> list[dict[str, Any]]:
    if not SNP.is_dir():
        return []
    return list(json.loads((SNP / "manifest.json").read_text()))


SAMPLES = {s["name"]: s for s in _samples()}


def report_of(name: str) -> bytes:
    return (SNP / SAMPLES[name]["files"]["report"]).read_bytes()


def collateral_of(name: str, **overrides: bytes) -> Collateral:
    collateral = Collateral()
    for role, filename in SAMPLES[name]["files"].items():
        if role in COLLATERAL_ROLES:
            collateral.set(COLLATERAL_ROLES[role], (SNP / filename).read_bytes())
    for role, data in overrides.items():
        collateral.set(role.replace("__", "."), data)
    return collateral


def suggested_now(name: str) -> dt.datetime:
    return dt.datetime.fromisoformat(SAMPLES[name]["validity"]["suggested_now"])


def ctx_for(name: str, **changes: Any) -> VerifyContext:
    ctx = VerifyContext(now=suggested_now(name), collateral=collateral_of(name))
    for key, value in changes.items():
        setattr(ctx, key, value)
    return ctx




def rejected(evidence: bytes, ctx: VerifyContext) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        SnpVerifier().verify(evidence, ctx)
    return info.value


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_verifies_to_manifest_values(name: str) -> None:
    expected = SAMPLES[name]["expected"]
    result = SnpVerifier().verify(report_of(name), ctx_for(name))
    claims = result.claims
    assert result.tee == "snp"
    for field in (
        "measurement", "host_data", "chip_id", "report_data", "id_key_digest", "author_key_digest",
        "policy", "platform_info", "reported_tcb", "current_tcb", "committed_tcb", "launch_tcb",
        "version", "guest_svn", "vmpl", "signing_key",
    ):  # fmt: skip
        assert claims[field] == expected[field], field
    assert claims["product"] == expected["product_family"]
    decoded = {k: v for k, v in expected["reported_tcb_decoded"].items() if k != "layout"}
    assert claims["tcb"] == decoded
    assert claims["debug"] == bool(int(expected["policy"], 16) & (1 << 19))
    assert json.dumps(result.as_json())  # JSON-ready


def test_debug_claim_follows_policy_bit() -> None:
    # go-sev-guest's guest ran with policy 0xb0000: DEBUG (bit 19) allowed; Microsoft's 0x3001f does not.
    gosev = SnpVerifier().verify(report_of("gosevguest_milan_v2"), ctx_for("gosevguest_milan_v2"))
    assert gosev.claims["debug"] is True
    milan = SnpVerifier().verify(report_of("microsoft_milan_v3"), ctx_for("microsoft_milan_v3"))
    assert milan.claims["debug"] is False


def test_second_vcek_for_same_chip_verifies() -> None:
    alt = (SNP / SAMPLES["microsoft_milan_v3"]["files"]["vcek_alt"]).read_bytes()
    ctx = ctx_for("microsoft_milan_v3", collateral=collateral_of("microsoft_milan_v3", vcek__der=alt))
    claims = SnpVerifier().verify(report_of("microsoft_milan_v3"), ctx).claims
    assert claims["chip_id"] == SAMPLES["microsoft_milan_v3"]["expected"]["chip_id"]


def test_packaged_ask_used_when_collateral_has_only_the_vcek() -> None:
    name = "microsoft_genoa_v3"
    vcek = (SNP / SAMPLES[name]["files"]["vcek"]).read_bytes()
    ctx = ctx_for(name, collateral=Collateral(vcek__der=vcek))
    assert SnpVerifier().verify(report_of(name), ctx).claims["product"] == "Genoa"


def test_collateral_directory_roles(tmp_path: Path) -> None:
    name = "virtee_milan_v2"
    (tmp_path / "vcek.der").write_bytes((SNP / SAMPLES[name]["files"]["vcek"]).read_bytes())
    (tmp_path / "ask_ark.pem").write_bytes((SNP / SAMPLES[name]["files"]["ask_ark_chain"]).read_bytes())
    ctx = ctx_for(name, collateral=Collateral(tmp_path))
    assert SnpVerifier().verify(report_of(name), ctx).claims["measurement"].startswith("7a1e5c26")


def test_matches_sniffs_reports_only() -> None:
    verifier = SnpVerifier()
    for name in SAMPLES:
        assert verifier.matches(report_of(name))
    report = report_of("microsoft_milan_v3")
    assert not verifier.matches(report[:-1])
    assert not verifier.matches(b"\x09" + report[1:])  # version 9
    nitro = next((DATA / "nitro").glob("*.cbor"), None)
    if nitro is not None:
        assert not verifier.matches(nitro.read_bytes())


def test_plugin_contract() -> None:
    assert PLUGINS == (SnpVerifier,)
    assert (SnpVerifier.name, SnpVerifier.tee) == ("snp", "snp")


# -- mutations -------------------------------------------------------------------------------------------

SIGNED_OFFSETS = {
    "guest_svn": 0x04,
    "policy": 0x08,
    "family_id": 0x10,
    "current_tcb": 0x38,
    "report_data": 0x50,
    "measurement": 0x90,
    "host_data": 0xC0,
    "id_key_digest": 0xE0,
    "report_id": 0x140,
    "committed_tcb": 0x1E0,
    "launch_tcb": 0x1F0,
    "last_signed_byte": 0x29F,
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("field", sorted(SIGNED_OFFSETS))
def test_flipped_bit_in_signed_report_is_rejected(name: str, field: str) -> None:
    # bit 1: keeps policy's reserved bit and current_tcb >= reported_tcb from failing first
    error = rejected(flip(report_of(name), SIGNED_OFFSETS[field], bit=1), ctx_for(name))
    assert error.layer is Layer.SIGNATURE, str(error)


@pytest.mark.parametrize("offset", [0x2A0, 0x2A0 + 30, 0x2A0 + 72, 0x2A0 + 72 + 47])
def test_flipped_signature_bit_is_rejected(offset: int) -> None:
    name = "microsoft_turin_v5"
    assert rejected(flip(report_of(name), offset), ctx_for(name)).layer is Layer.SIGNATURE


def test_signature_with_bytes_above_48_is_rejected() -> None:
    name = "virtee_milan_v2"
    assert rejected(flip(report_of(name), 0x2A0 + 60), ctx_for(name)).layer is Layer.SIGNATURE


def test_report_for_another_chip_is_rejected() -> None:
    # chip_id is signed too, but the VCEK/chip binding is checked first and names the cause.
    name = "gosevguest_milan_v2"
    error = rejected(flip(report_of(name), 0x1A0), ctx_for(name))
    assert error.layer is Layer.CHAIN and "chip" in str(error)


def test_reported_tcb_not_matching_vcek_is_rejected() -> None:
    name = "microsoft_genoa_v3"
    error = rejected(flip(report_of(name), 0x180 + 7), ctx_for(name))  # ucode SVN byte
    assert error.layer is Layer.CHAIN and "ucode" in str(error)


@pytest.mark.parametrize("length", [0, 100, 0x2A0, 1183, 1185])
def test_truncated_or_padded_report_is_rejected(length: int) -> None:
    name = "microsoft_milan_v3"
    evidence = (report_of(name) + b"\0")[:length]
    assert rejected(evidence, ctx_for(name)).layer is Layer.FORMAT


def test_unsupported_version_is_rejected() -> None:
    name = "microsoft_milan_v3"
    report = bytearray(report_of(name))
    report[0] = 1
    assert rejected(bytes(report), ctx_for(name)).layer is Layer.FORMAT


def test_wrong_vcek_for_the_chip_is_rejected() -> None:
    other = (SNP / SAMPLES["virtee_milan_v2"]["files"]["vcek"]).read_bytes()
    name = "gosevguest_milan_v2"
    # pin a time at which both certificates are valid, so only the chip differs
    ctx = ctx_for(name, collateral=collateral_of(name, vcek__der=other), now=suggested_now("virtee_milan_v2"))
    error = rejected(report_of(name), ctx)
    assert error.layer is Layer.CHAIN and "chip" in str(error)


def test_milan_chain_with_genoa_ark_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "amd_milan_ark.pem").write_bytes((ROOTS / "amd_genoa_ark.pem").read_bytes())
    for name in ("virtee_milan_v2", "microsoft_milan_v3", "gosevguest_milan_v2"):
        # the genuine chain verifies first: a remembered link must not vouch for another ARK
        SnpVerifier().verify(report_of(name), ctx_for(name))
        error = rejected(report_of(name), ctx_for(name, roots=Roots(tmp_path)))
        assert error.layer is Layer.CHAIN, str(error)


def test_milan_vcek_with_genoa_ask_is_rejected() -> None:
    name = "microsoft_milan_v3"
    ctx = ctx_for(name, collateral=collateral_of(name, ask__pem=(ROOTS / "amd_genoa_ask.pem").read_bytes()))
    assert rejected(report_of(name), ctx).layer is Layer.CHAIN


def test_ask_ark_bundle_with_foreign_ark_is_rejected() -> None:
    name = "virtee_milan_v2"
    bundle = (ROOTS / "amd_milan_ask.pem").read_bytes() + (ROOTS / "amd_genoa_ark.pem").read_bytes()
    ctx = ctx_for(name, collateral=collateral_of(name, ask_ark__pem=bundle))
    assert rejected(report_of(name), ctx).layer is Layer.CHAIN


def test_genoa_report_with_milan_vcek_is_rejected() -> None:
    # The v3 report's CPUID says Genoa; a Milan certificate cannot sign for it.
    milan_vcek = (SNP / SAMPLES["microsoft_milan_v3"]["files"]["vcek"]).read_bytes()
    name = "microsoft_genoa_v3"
    ctx = ctx_for(name, collateral=Collateral(vcek__der=milan_vcek))
    error = rejected(report_of(name), ctx)
    assert error.layer is Layer.CHAIN and "Genoa" in str(error)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_expired_and_not_yet_valid_vcek_are_rejected(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # serial number 0
        vcek = x509.load_der_x509_certificate((SNP / SAMPLES[name]["files"]["vcek"]).read_bytes())
    second = dt.timedelta(seconds=1)
    for when in (vcek.not_valid_after_utc + second, vcek.not_valid_before_utc - second):
        error = rejected(report_of(name), ctx_for(name, now=when))
        assert error.layer is Layer.CHAIN and "VCEK" in str(error)


def test_missing_vcek_is_a_collateral_error() -> None:
    name = "microsoft_turin_v5"
    assert rejected(report_of(name), ctx_for(name, collateral=Collateral())).layer is Layer.COLLATERAL


def test_report_data_binding() -> None:
    name = "gosevguest_milan_v2"
    verifier = SnpVerifier()
    full = bytes.fromhex(SAMPLES[name]["expected"]["report_data"])
    verifier.verify(report_of(name), ctx_for(name, expected_report_data=full))
    verifier.verify(report_of(name), ctx_for(name, expected_report_data=bytes.fromhex("0102030405")))
    for wrong in (bytes.fromhex("0102030406"), full + b"\0", b"\xff" * 64):
        error = rejected(report_of(name), ctx_for(name, expected_report_data=wrong))
        assert error.layer is Layer.KEY_BINDING


def test_parse_report_fields() -> None:
    report = parse_report(report_of("microsoft_turin_v5"))
    assert (report.cpuid_family, report.cpuid_model, report.cpuid_stepping) == (0x1A, 2, 1)
    assert report.signing_key == "vcek" and not report.chip_id_masked


# -- attester --------------------------------------------------------------------------------------------


def test_attester_unavailable_without_device(tmp_path: Path) -> None:
    attester = SnpAttester(device=tmp_path / "sev-guest", tsm_report_dir=tmp_path / "tsm" / "report")
    with pytest.raises(AttesterUnavailable, match="no .*sev-guest or configfs-tsm on this host"):
        attester.available()
    with pytest.raises(AttesterUnavailable):
        attester.attest(b"\x01" * 64)


def test_attester_ignores_configfs_tsm_of_another_provider(tmp_path: Path) -> None:
    # A directory that is not configfs: entries have no "provider", as with a non-SNP provider.
    tsm = tmp_path / "report"
    tsm.mkdir()
    attester = SnpAttester(device=tmp_path / "sev-guest", tsm_report_dir=tsm)
    with pytest.raises(AttesterUnavailable, match="not backed by sev_guest"):
        attester.available()
    assert list(tsm.iterdir()) == []  # the probe entry was removed


@pytest.mark.skipif(
    Path("/dev/sev-guest").exists() or Path("/sys/kernel/config/tsm/report").exists(),
    reason="this host has an SEV-SNP guest interface",
)
def test_attester_says_why_on_this_host() -> None:
    with pytest.raises(AttesterUnavailable, match=r"^no /dev/sev-guest or configfs-tsm on this host$"):
        SnpAttester().available()


def test_attester_rejects_oversized_report_data() -> None:
    with pytest.raises(ValueError, match="at most 64"):
        SnpAttester().attest(b"\0" * 65)
