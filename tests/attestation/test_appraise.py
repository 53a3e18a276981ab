"""appraise(): verifier choice, report-data and nonce checks, policy, and verdicts that never raise."""

from __future__ import annotations

import pytest

from clave.attestation.appraise import UnknownTee, appraise, check_bound, pick_verifier, run_verifier
from clave.attestation.attesters.sample import DEFAULT_MEASUREMENT, SampleAttester
from clave.attestation.base import Layer, VerificationError, VerifiedEvidence, Verifier, VerifyContext
from clave.attestation.policy import Policy

REPORT_DATA = b"clave appraisal test"


@pytest.fixture
def evidence() -> bytes:
    return SampleAttester().attest(REPORT_DATA).data


def test_accepted_verdict_as_json(evidence: bytes) -> None:
    verdict = appraise(evidence)
    assert verdict.accepted and verdict.tee == "sample" and verdict.insecure
    out = verdict.as_json()
    assert out["verdict"] == "accepted" and out["reason"] is None and "layer" not in out
    assert out["claims"]["measurement"] == DEFAULT_MEASUREMENT.hex()


def test_expected_report_data_and_nonce(evidence: bytes) -> None:
    assert appraise(evidence, ctx=VerifyContext(expected_report_data=REPORT_DATA)).accepted
    wrong = appraise(evidence, ctx=VerifyContext(expected_report_data=b"something else"))
    assert wrong.layer is Layer.KEY_BINDING and wrong.as_json()["verdict"] == "rejected"
    assert appraise(evidence, ctx=VerifyContext(nonce=REPORT_DATA[:8])).accepted
    assert appraise(evidence, ctx=VerifyContext(nonce=b"stale")).layer is Layer.FRESHNESS


def test_policy_rejection_is_a_verdict(evidence: bytes) -> None:
    verdict = appraise(evidence, policy=Policy(reference_values={"measurement": ("00" * 32,)}))
    assert not verdict.accepted and verdict.layer is Layer.POLICY and verdict.claims == {}
    assert verdict.reason is not None and "measurement" in verdict.reason


def test_verifier_choice() -> None:
    assert pick_verifier(b"", "sample").tee == "sample"
    with pytest.raises(UnknownTee, match="no verifier for 'sev'"):
        pick_verifier(b"", "sev")
    with pytest.raises(VerificationError) as excinfo:
        pick_verifier(b"\x00" * 3, "auto")
    assert excinfo.value.layer is Layer.FORMAT
    assert appraise(b"\x00" * 3).layer is Layer.FORMAT


def test_check_bound_uses_report_data_and_leaves_other_bindings_to_their_verifier() -> None:
    sgx = VerifiedEvidence("sgx", {"report_data": (b"abc" + bytes(61)).hex()})
    check_bound(sgx, b"abc", Layer.KEY_BINDING, "x")
    check_bound(sgx, b"abc" + bytes(61), Layer.KEY_BINDING, "x")
    with pytest.raises(VerificationError, match="does not match x"):
        check_bound(sgx, b"abd", Layer.KEY_BINDING, "x")
    tpm = VerifiedEvidence("tpm", {"nonce": "00" * 32, "pcrs": {}})  # TPM extraData is checked by its verifier
    check_bound(tpm, b"abc", Layer.KEY_BINDING, "x")


class _Crashing(Verifier):
    name = tee = "crashing"

    def verify(self, evidence: bytes, ctx: VerifyContext) -> VerifiedEvidence:
        return VerifiedEvidence("crashing", {"first": evidence[100]})


def test_verifier_crash_on_hostile_input_is_a_format_rejection() -> None:
    with pytest.raises(VerificationError, match="crashing verifier failed on this evidence") as excinfo:
        run_verifier(_Crashing(), b"short", VerifyContext())
    assert excinfo.value.layer is Layer.FORMAT
