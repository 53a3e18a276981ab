"""Appraisal policy: JSON parsing and each rule, on claims shaped like the verifiers' output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clave.attestation.base import Layer, VerificationError, VerifiedEvidence
from clave.attestation.policy import (
    DEFAULT_ALLOWED_TCB_STATUS,
    DEFAULT_POLICY,
    NO_REFERENCE_VALUES_WARNING,
    Policy,
    PolicyError,
)

MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def sgx(tcb_status: str | None = "UpToDate", **claims: Any) -> VerifiedEvidence:
    base: dict[str, Any] = {
        "mrenclave": MRENCLAVE,
        "mrsigner": "81" * 32,
        "isv_prodid": 0,
        "isv_svn": 3,
        "debug": False,
        "report_data": "00" * 64,
    }
    base.update(claims)
    return VerifiedEvidence(tee="sgx", claims=base, tcb_status=tcb_status)


def rejection(policy: Policy, evidence: VerifiedEvidence) -> str:
    with pytest.raises(VerificationError) as excinfo:
        policy.check(evidence)
    assert excinfo.value.layer is Layer.POLICY
    return str(excinfo.value)


@pytest.mark.parametrize("status", DEFAULT_ALLOWED_TCB_STATUS)
def test_default_policy_accepts_the_four_acceptable_statuses(status: str) -> None:
    assert DEFAULT_POLICY.check(sgx(status)) == [NO_REFERENCE_VALUES_WARNING]


@pytest.mark.parametrize(
    "status", ["OutOfDate", "OutOfDateConfigurationNeeded", "Revoked", "NoMatchingTcbLevel"]
)
def test_default_policy_rejects_bad_tcb_status_naming_it(status: str) -> None:
    reason = rejection(DEFAULT_POLICY, sgx(status))
    assert reason.startswith("policy: tcb_status") and status in reason


def test_wildcard_accepts_any_status_and_missing_status_passes() -> None:
    anything = Policy.from_dict({"allowed_tcb_status": ["*"]})
    assert anything.check(sgx("Revoked")) == [NO_REFERENCE_VALUES_WARNING]
    nitro = VerifiedEvidence(tee="nitro", claims={"pcr0": "00" * 48, "debug": False})
    DEFAULT_POLICY.check(nitro)
    nothing = Policy.from_dict({"allowed_tcb_status": []})
    assert "none" in rejection(nothing, sgx("UpToDate"))


def test_debug_refused_by_default_and_allowed_on_request() -> None:
    assert rejection(DEFAULT_POLICY, sgx(debug=True)).startswith("policy: debug")
    Policy.from_dict({"allow_debug": True}).check(sgx(debug=True))


def test_reference_values_match_case_insensitively_and_name_the_claim() -> None:
    pinned = Policy.from_dict({"reference_values": {"mrenclave": ["ab" * 32, MRENCLAVE.upper()]}})
    assert pinned.check(sgx()) == []
    other = Policy.from_dict({"reference_values": {"mrenclave": ["ab" * 32]}})
    assert "mrenclave" in rejection(other, sgx())
    absent = Policy.from_dict({"reference_values": {"mr_td": ["00" * 48]}})
    assert "mr_td: claim absent" in rejection(absent, sgx())


def test_reference_values_numbers_strings_and_tcb_status() -> None:
    assert Policy.from_dict({"reference_values": {"isv_prodid": ["0"]}}).check(sgx()) == []
    assert Policy.from_dict({"reference_values": {"isv_prodid": [0]}}).check(sgx()) == []
    assert "isv_prodid" in rejection(Policy.from_dict({"reference_values": {"isv_prodid": [1]}}), sgx())
    status_pin = Policy.from_dict({"reference_values": {"tcb_status": ["UpToDate"]}})
    assert "tcb_status" in rejection(status_pin, sgx("SWHardeningNeeded"))


def test_dotted_names_reach_into_tpm_pcrs() -> None:
    tpm = VerifiedEvidence(tee="tpm", claims={"pcrs": {"0": "aa" * 32, "7": "bb" * 32}, "nonce": "01"})
    Policy.from_dict({"reference_values": {"pcrs.7": ["BB" * 32]}}).check(tpm)
    assert "pcrs.0" in rejection(Policy.from_dict({"reference_values": {"pcrs.0": ["bb" * 32]}}), tpm)
    assert "pcrs.9: claim absent" in rejection(
        Policy.from_dict({"reference_values": {"pcrs.9": ["00"]}}), tpm
    )


def test_min_svn() -> None:
    Policy.from_dict({"min_svn": {"isv_svn": 3}}).check(sgx())
    reason = rejection(Policy.from_dict({"min_svn": {"isv_svn": 4}}), sgx())
    assert "isv_svn: 3 is below the minimum 4" in reason
    assert "not a number" in rejection(Policy.from_dict({"min_svn": {"mrenclave": 1}}), sgx())
    assert "claim absent" in rejection(Policy.from_dict({"min_svn": {"tee_tcb_svn": 1}}), sgx())


@pytest.mark.parametrize(
    "document, message",
    [
        ('{"allowed_tcb_status": "UpToDate"}', "allowed_tcb_status"),
        ('{"allow_debug": "no"}', "allow_debug"),
        ('{"reference_values": {"mrenclave": "ab"}}', "reference_values"),
        ('{"reference_values": {"mrenclave": []}}', "reference_values"),
        ('{"min_svn": {"isv_svn": "3"}}', "min_svn"),
        ('{"min_svn": {"isv_svn": true}}', "min_svn"),
        ('{"allow_insecure": true}', "unknown policy keys"),
        ("[]", "JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_policies_are_usage_errors(document: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_json(document)


def test_load_round_trip_and_unreadable_file(tmp_path: Path) -> None:
    document = {
        "allowed_tcb_status": ["UpToDate"],
        "allow_debug": True,
        "reference_values": {"mrenclave": [MRENCLAVE]},
        "min_svn": {"isv_svn": 2},
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    policy = Policy.load(path)
    assert policy.to_dict() == document
    assert policy.check(sgx(debug=True)) == []
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "absent.json")


def test_default_policy_is_the_empty_document() -> None:
    assert Policy.from_json("{}") == DEFAULT_POLICY
    assert DEFAULT_POLICY.warnings() == [NO_REFERENCE_VALUES_WARNING]
