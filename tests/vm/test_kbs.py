"""A vm pod's secrets come from a key broker, released to its guest's evidence only: with `enclave.kbs.*`
annotations the guest agent runs the KBS protocol (its TPM quote bound to the broker's nonce and an ephemeral
key, TLS end to end through the host's tunnel) and writes the secret into the container before it starts.
A broker whose policy pins another guest refuses, and the container does not start (one line, nothing left).
Real clave-kbs on loopback, real QEMU, OVMF and swtpm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clave.tools.bundles import make_bundle
from clave.vm.guest import Guest
from tests.vm.test_handler import vm_guest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kbs"))
from kbs_env import Kbs, make_material, start_kbs, stop_kbs  # noqa: E402

__all__ = ["vm_guest"]  # a fixture
BIN = Path(sys.executable).parent
RESOURCE = "default/key/vm-token"
SECRET = "token-for-the-measured-guest"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kbs]:
    if not os.path.exists("/usr/share/qemu/OVMF.fd"):
        pytest.skip("Debian's ovmf is needed for a vTPM")
    base = tmp_path_factory.mktemp("vmkbs")
    (base / "material").mkdir()
    server = start_kbs(make_material(base / "material"), base / "state", "--allow-insecure")
    try:
        secret = base / "secret"
        secret.write_text(SECRET)
        admin(server, "put-resource", RESOURCE, str(secret))
        yield server
    finally:
        stop_kbs(server)


def admin(kbs: Kbs, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "clave.kbs.cli", args[0], "--url", kbs.url, "--ca-file",
                           kbs.ca_file, "--admin-key", str(kbs.material.admin_private), *args[1:]],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def allow(kbs: Kbs, tmp: Path, pcr8: str) -> None:
    """The tenant's policy: the resource goes to a guest whose measured boot (PCR 8) is ``pcr8``."""
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({RESOURCE: [{"tee": ["tpm"], "reference_values": {"pcrs.8": [pcr8]}}]}))
    admin(kbs, "set-policy", str(policy))


def vm_bundle(tmp: Path, kbs: Kbs) -> Path:
    bundle = tmp / "bundle"
    config = make_bundle(str(bundle), ["sh", "-c", "cat /run/secrets/token; echo; ls -l /run/secrets/token"])
    config["mounts"].append({"destination": "/run/secrets", "type": "tmpfs", "source": "tmpfs",
                             "options": ["nosuid", "nodev", "mode=0700"]})
    config["annotations"] = {"io.clave.handler": "vm", "enclave.kbs.url": kbs.url, "enclave.kbs.ca": kbs.ca_file,
                             "enclave.kbs.resources": f"{RESOURCE}=/run/secrets/token"}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def clave_run(tmp: Path, bundle: Path, cid: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "clave"), "--root", str(tmp / "state"), "run", "--bundle", str(bundle), cid],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)


def test_the_measured_guest_gets_its_secret(vm_guest: Guest, broker: Kbs, tmp_path: Path) -> None:
    from clave.vm.measure import reference_pcrs

    allow(broker, tmp_path, reference_pcrs(vm_guest.digests())[8])
    done = clave_run(tmp_path, vm_bundle(tmp_path, broker), "kbs-ok")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(SECRET + "\n"), done.stdout
    assert "-r--------" in done.stdout  # written for the process user only, on the container's tmpfs
    assert [e for e in broker.audit() if e.get("resource") == RESOURCE and e.get("tee") == "tpm"], broker.audit()


def test_another_guest_is_refused_and_nothing_starts(vm_guest: Guest, broker: Kbs, tmp_path: Path) -> None:
    allow(broker, tmp_path, "00" * 32)  # the policy pins a guest other than this one
    done = clave_run(tmp_path, vm_bundle(tmp_path, broker), "kbs-refused")
    assert done.returncode != 0 and SECRET not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "kbs:" in lines[0] and "refused" in lines[0].lower(), done.stderr
    assert not (tmp_path / "state").exists() or os.listdir(tmp_path / "state") == []
