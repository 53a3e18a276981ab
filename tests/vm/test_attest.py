"""A vm container attests for itself: with `io.clave.vm.tpm=true` its VM has a swtpm and boots through OVMF,
the guest measures its boot (PCR 8) and the container (PCR 11), and `clave attest ID --nonce` returns the
guest's quote. `clave-verify evidence --tee tpm --nonce --policy` (the policy `clave vm measure` writes)
accepts it, rejects it for another nonce (freshness), and rejects a guest whose image changed by one byte
(policy); clave-relay serves it to `clave-verify remote`. Real QEMU, OVMF and swtpm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clave.tools.bundles import make_bundle
from clave.vm.guest import Guest
from tests.vm.conftest import short_dir
from tests.vm.test_handler import vm_guest

__all__ = ["vm_guest"]  # a fixture
BIN = Path(sys.executable).parent


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, args))}: {done.stderr}"
    return done


def verify(evidence: Path, nonce: str, policy: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "clave-verify", "evidence", evidence, "--tee", "tpm", "--nonce", nonce, "--policy", policy,
               check=False)


def tpm_bundle(tmp_path: Path) -> Path:
    """A bundle of a vm container with a vTPM, running ``sleep 300``."""
    bundle = tmp_path / "bundle"
    config = make_bundle(str(bundle), ["sleep", "300"])
    config["annotations"] = {"io.clave.handler": "vm", "io.clave.vm.tpm": "true"}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def create(clave: list[Path], bundle: Path, cid: str, log: Path) -> subprocess.CompletedProcess[bytes]:
    """`clave create` with its stdio on ``log``: it becomes the container's (the keeper holds it), not pipes a
    test would wait on."""
    with open(log, "w") as out:
        return subprocess.run([str(a) for a in (*clave, "create", "--bundle", bundle, cid)],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=180)


def test_a_vm_container_quote_verifies_against_the_measured_guest(vm_guest: Guest, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    run(BIN / "clave", "vm", "measure", "--policy-out", policy)
    assert "pcrs.8" in json.loads(policy.read_text())["reference_values"]
    bundle = tpm_bundle(tmp_path)
    root, cid = tmp_path / "state", "attested"
    clave = [BIN / "clave", "--root", root]
    created = create(clave, bundle, cid, tmp_path / "create.out")
    assert created.returncode == 0, (tmp_path / "create.out").read_text()
    try:
        run(*clave, "start", cid)
        reply = run(*clave, "attest", cid, "--nonce", "c0ffee", "--format", "json").stdout
        assert json.loads(reply)["tee"] == "tpm"
        evidence = tmp_path / "evidence.json"
        evidence.write_text(reply)
        accepted = verify(evidence, "c0ffee", policy)
        assert accepted.returncode == 0 and "accepted: tpm evidence" in accepted.stdout, accepted.stdout
        assert "event_log_pcrs: [8, 11]" in accepted.stdout  # the boot and the container were measured
        replayed = verify(evidence, "c0ffef", policy)
        assert replayed.returncode != 0 and "freshness" in replayed.stdout + replayed.stderr
        remote_verification(root, cid, policy)
    finally:
        run(*clave, "delete", "--force", cid)
    assert not list(root.iterdir())


def test_each_clone_has_its_own_tpm_identity(vm_guest: Guest, tmp_path: Path) -> None:
    """Two vm containers from one template: each guest's TPM has its own attestation key, so a verifier that
    pins one clone's key refuses the other's quote (policy), even for the same nonce."""
    bundle = tpm_bundle(tmp_path)
    root = tmp_path / "state"
    clave = [BIN / "clave", "--root", root]
    keys, evidence = [], []
    try:
        for cid in ("clone-a", "clone-b"):
            assert create(clave, bundle, cid, tmp_path / f"{cid}.out").returncode == 0
            run(*clave, "start", cid)
            path = tmp_path / f"{cid}.json"
            path.write_text(run(*clave, "attest", cid, "--nonce", "0a0b", "--format", "json").stdout)
            evidence.append(path)
            verdict = json.loads(run(BIN / "clave-verify", "evidence", path, "--tee", "tpm", "--nonce", "0a0b",
                                     "--json").stdout)
            keys.append(verdict["claims"]["ak_public_sha256"])
        restored = [json.loads(run(*clave, "state", cid).stdout)["vm"]["restored"] for cid in ("clone-a", "clone-b")]
    finally:
        for cid in ("clone-a", "clone-b"):
            run(*clave, "delete", "--force", cid, check=False)
    assert restored[1], "the second container is a template's clone"
    assert keys[0] != keys[1], "two clones share an attestation key"
    pin_a = tmp_path / "pin-a.json"
    pin_a.write_text(json.dumps({"reference_values": {"ak_public_sha256": [keys[0]]}}))
    assert verify(evidence[0], "0a0b", pin_a).returncode == 0
    refused = verify(evidence[1], "0a0b", pin_a)
    assert refused.returncode != 0 and "policy" in refused.stdout + refused.stderr, refused.stdout


def test_a_dying_swtpm_stops_the_pod_cleanly(vm_guest: Guest, tmp_path: Path) -> None:
    """The vTPM's swtpm killed under a running container: the VM is stopped (its measurements and quotes are
    gone), the container is stopped with 137 and says why; delete leaves nothing."""
    import signal
    import time

    bundle = tpm_bundle(tmp_path)
    root, cid = tmp_path / "state", "tpm-dies"
    clave = [BIN / "clave", "--root", root]
    assert create(clave, bundle, cid, tmp_path / "create.out").returncode == 0
    try:
        run(*clave, "start", cid)
        vm_dir = json.loads((root / cid / "state.json").read_text())["handler_state"]["vm_dir"]
        vm = json.loads(Path(vm_dir, "vm.json").read_text())
        os.kill(vm["swtpm_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (state := json.loads(run(*clave, "state", cid).stdout))["status"] != "stopped":
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert "swtpm" in state["vm"]["exit_reason"], state
        assert not os.path.exists(f"/proc/{vm['pid']}") or \
            Path(f"/proc/{vm['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", "QEMU still runs"
    finally:
        run(*clave, "delete", "--force", cid)
    assert not list(root.iterdir()) and not os.path.exists(vm_dir)


def remote_verification(root: Path, cid: str, policy: Path) -> None:
    """clave-relay serves the vm container's evidence as it does an enclave's: clave-verify remote accepts the
    quote, bound to its nonce and the relay's session, against the measured guest's policy."""
    relay = subprocess.Popen([str(BIN / "clave-relay"), "--root", str(root), "--attester", "sample", "--listen",
                              "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert relay.stdout is not None
        line = relay.stdout.readline()
        assert line.startswith("clave-relay: listening on "), line
        done = run(BIN / "clave-verify", "remote", line.split()[3], "--container", cid, "--policy", policy, "--json",
                   check=False)
        verdict = json.loads(done.stdout)
        assert done.returncode == 0 and verdict["verdict"] == "accepted" and verdict["tee"] == "tpm", verdict
        assert verdict["claims"]["pcrs"]["8"] == json.loads(policy.read_text())["reference_values"]["pcrs.8"][0]
    finally:
        relay.terminate()
        relay.wait(timeout=10)


def test_a_guest_image_changed_by_one_byte_is_refused(vm_guest: Guest, tmp_path: Path) -> None:
    from clave.vm.measure import policy as measured_policy
    from clave.vm.qemu import Vm, VmConfig

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(measured_policy(vm_guest.digests())))
    tampered = Path(short_dir("vmg-"))
    try:
        for name in os.listdir(vm_guest.directory):
            shutil.copy(os.path.join(vm_guest.directory, name), tampered / name)
        image = tampered / vm_guest.manifest["outputs"]["image"]["file"]
        with open(image, "r+b") as f:  # the image's last byte: free space, the guest still boots
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        vm = Vm.create(VmConfig(str(tampered / "vm"), Guest(str(tampered)), machine="q35", tpm=True, template=False))
        try:
            vm.start()
            evidence, _log = vm.agent().quote(bytes.fromhex("c0ffee"))
        finally:
            vm.destroy()
        path = tmp_path / "evidence.bin"
        path.write_bytes(evidence)
        refused = verify(path, "c0ffee", policy)
        assert refused.returncode != 0 and "pcrs.8" in refused.stdout + refused.stderr, refused.stdout
    finally:
        shutil.rmtree(tampered, ignore_errors=True)


pytestmark = pytest.mark.skipif(not os.path.exists("/usr/share/qemu/OVMF.fd"), reason="Debian's ovmf is needed")
