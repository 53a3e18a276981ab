"""Measured boot (clave.vm.measure, clave.vm.swtpm): the host's reference values, the event log the verifier
replays, the policy `clave vm measure` writes, and a per-VM swtpm started and stopped with its VM (real QEMU
on q35 through OVMF, real swtpm), and the guest's quote over it, verified."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clave.attestation import tpm_wire as wire
from clave.attestation.base import Layer, VerificationError, VerifiedEvidence
from clave.attestation.policy import Policy
from clave.vm import measure
from clave.vm.errors import VmError
from clave.vm.guest import Guest
from clave.vm.qemu import Vm, VmConfig
from tests.vm.conftest import qemu_pids_for, short_dir

CLAVE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".venv/bin/clave")


def test_reference_log_replays_to_the_reference_pcr(guest: Guest) -> None:
    digests = guest.digests()
    log = wire.parse_event_log(measure.reference_log(digests))
    assert log.algorithms == frozenset({wire.ALG_SHA256})
    assert [e.data for e in log.events] == [f"clave:{c}".encode() for c in measure.BOOT_COMPONENTS]
    replayed = wire.replay_event_log(log, wire.ALG_SHA256)
    assert replayed == {measure.GUEST_PCR: bytes.fromhex(measure.reference_pcrs(digests)[measure.GUEST_PCR])}


def test_one_changed_byte_of_the_image_changes_the_reference(guest: Guest) -> None:
    digests = dict(guest.digests())
    before = measure.reference_pcrs(digests)
    digests["image"] = "00" + digests["image"][2:]
    assert measure.reference_pcrs(digests) != before


def test_the_agent_digest_is_what_the_guest_computes(guest: Guest) -> None:
    """The guest hashes the package it runs from with measure.package_files/agent_digest_of; the host's build
    recorded the same algorithm over the same files."""
    import clave

    files = measure.package_files(os.path.dirname(os.path.abspath(clave.__file__)))
    digest = measure.agent_digest_of([(rel, measure.file_sha256(p)) for rel, p in files])
    assert digest == guest.digests()["agent"]


def test_container_measurements_and_their_log() -> None:
    image, config = measure.container_digests("sha256:" + "ab" * 32, b'{"process":{}}')
    assert image == bytes.fromhex("ab" * 32) and len(config) == 32
    other, _ = measure.container_digests("docker.io/library/busybox:latest", b"")
    assert len(other) == 32
    log = measure.log_header() + measure.log_event(measure.CONTAINER_PCR, image, b"clave:container-image c1")
    replayed = wire.replay_event_log(wire.parse_event_log(log), wire.ALG_SHA256)
    assert replayed[measure.CONTAINER_PCR] == measure.replay([image])


def test_clave_vm_measure_writes_a_policy_that_pins_pcr8(guest: Guest, tmp_path: Path) -> None:
    out = str(tmp_path / "policy.json")
    done = subprocess.run([CLAVE, "vm", "measure", "--guest", guest.directory,
                           "--policy-out", out], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    with open(out) as f:
        doc = json.load(f)
    expected = measure.reference_pcrs(guest.digests())[measure.GUEST_PCR]
    assert report["pcrs"] == {"8": expected}
    assert doc == {"reference_values": {"pcrs.8": [expected]}}
    policy = Policy.load(out)
    policy.check(VerifiedEvidence(tee="tpm", claims={"pcrs": {"8": expected}}))
    with pytest.raises(VerificationError) as err:
        policy.check(VerifiedEvidence(tee="tpm", claims={"pcrs": {"8": "00" * 32}}))
    assert err.value.layer == Layer.POLICY and "pcrs.8" in str(err.value)


def test_a_vtpm_needs_q35(guest: Guest) -> None:
    work = short_dir("vmb-")
    try:
        with pytest.raises(VmError, match="q35"):
            Vm.create(VmConfig(os.path.join(work, "vm"), guest, tpm=True))
    finally:
        shutil.rmtree(work)


@pytest.fixture(scope="module")
def tpm_vm(guest: Guest) -> Iterator[Vm]:
    """A booted q35 VM with its own swtpm (no template: the boot itself is what is measured)."""
    work = short_dir("vmb-")
    vm = Vm.create(VmConfig(os.path.join(work, "vm"), guest, machine="q35", tpm=True, template=False))
    try:
        vm.start()
        yield vm
    finally:
        state = vm.state_dir
        swtpm_pid = vm.swtpm_pid
        vm.destroy()
        assert not os.path.exists(state) and qemu_pids_for(state) == []
        assert not os.path.exists(f"/proc/{swtpm_pid}")
        shutil.rmtree(work)


def test_the_swtpm_runs_with_its_vm_and_its_state_is_the_vms(tpm_vm: Vm, guest: Guest) -> None:
    assert tpm_vm.swtpm_pid and os.path.exists(f"/proc/{tpm_vm.swtpm_pid}")
    with open(f"/proc/{tpm_vm.swtpm_pid}/cmdline", "rb") as f:
        assert os.path.join(tpm_vm.state_dir, "tpm").encode() in f.read()
    with open(os.path.join(tpm_vm.state_dir, "vm.json")) as f:
        assert json.load(f)["swtpm_pid"] == tpm_vm.swtpm_pid
    assert measure.boot_cmdline(guest.digests()) in " ".join(tpm_vm.command("tcg"))
    assert tpm_vm.agent().health() == 1


def test_the_guest_quotes_its_measured_boot(tpm_vm: Vm, guest: Guest) -> None:
    from clave.attestation.base import VerifyContext
    from clave.attestation.verifiers.tpm import TpmVerifier

    nonce = os.urandom(32)
    evidence, _log = tpm_vm.agent().quote(nonce)
    verified = TpmVerifier().verify(evidence, VerifyContext(nonce=nonce))
    assert verified.claims["pcrs"]["8"] == measure.reference_pcrs(guest.digests())[measure.GUEST_PCR]
    with pytest.raises(VerificationError) as err:
        TpmVerifier().verify(evidence, VerifyContext(nonce=os.urandom(32)))
    assert err.value.layer == Layer.FRESHNESS


def test_destroy_after_a_crash_stops_the_swtpm(guest: Guest) -> None:
    """destroy_state_dir alone (the caller died): QEMU and swtpm are found through vm.json and stopped."""
    from clave.vm.qemu import destroy_state_dir

    work = short_dir("vmb-")
    vm = Vm.create(VmConfig(os.path.join(work, "vm"), guest, machine="q35", tpm=True, template=False))
    try:
        vm.start_swtpm()
        pid = vm.swtpm_pid
        vm.swtpm = None  # forget the handle, as a new process would
        destroy_state_dir(vm.state_dir)
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        assert not os.path.exists(vm.state_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_clave_check_says_why_the_guest_is_not_a_confidential_vm(guest: Guest) -> None:
    """Here the guest attests with its vTPM; for TDX and SEV-SNP `clave check` names what is missing."""
    report = json.loads(subprocess.run([CLAVE, "check", "--format", "json"], capture_output=True, text=True,
                                       check=True).stdout)
    line = report["vm_attestation"]
    assert line.startswith("vTPM (swtpm, OVMF); confidential guests: "), line
    for tee, module, param in (("TDX", "kvm_intel", "tdx"), ("SEV-SNP", "kvm_amd", "sev_snp")):
        try:
            enabled = Path(f"/sys/module/{module}/parameters/{param}").read_text().strip() in ("Y", "1")
        except OSError:
            enabled = False
        if not enabled:
            assert f"{tee}: no ({module} {param}" in line, line
    assert f"guest kernel {guest.kernel_release} has no configfs-tsm (6.7+)" in line
