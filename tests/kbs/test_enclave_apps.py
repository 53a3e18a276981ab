"""The whole story on one host: clave-kbs holds a secret; a Python app runs as a WebAssembly enclave container
whose runtime attests to the KBS before the app starts and writes the released secret to a tmpfs the app reads;
an app changed by one byte (re-signed by someone else) is refused by the KBS, and an app changed without
re-signing never starts. Also `clave attest ID --kbs` on a running container and the attestation files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_clave

pytest.importorskip("wasmtime")
pytest.importorskip("joserfc")
pytest.importorskip("uvicorn")

from kbs_env import Kbs, make_material, start_kbs, stop_kbs  # noqa: E402

from clave.attestation import wasm_report as report  # noqa: E402
from clave.enclave.wasm import interpreters  # noqa: E402
from clave.tools import bundles  # noqa: E402

CLAVE = str(Path(sys.executable).parent / "clave")
RESOURCE = "default/key/greeting"
APP = """\
import sys
secret = open("/run/secrets/greeting").read()
print("the app read its secret:", secret)
"""

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root"),
    pytest.mark.skipif(not os.path.exists(bundles.BUSYBOX), reason="needs busybox-static"),
]


def clave(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_clave(*args, cwd=cwd, timeout=timeout)


class Story:
    def __init__(self, base: Path, kbs: Kbs) -> None:
        self.base = base
        self.kbs = kbs
        self.root = base / "state"
        self.key = base / "tenant.pem"
        clave("enclave", "keygen", "--out", str(self.key))

    def app(self, name: str, source: str, key: Path | None = None, **settings: str) -> Path:
        """A signed Python app bundle whose enclave runtime fetches RESOURCE into /run/secrets (a tmpfs)."""
        bundle = self.base / name
        config = bundles.make_app_bundle(str(bundle), {"/app/app.py": source}, ["python3", "app.py"], cwd="/app")
        config["mounts"].append({"destination": "/run/secrets", "type": "tmpfs", "source": "tmpfs",
                                 "options": ["nosuid", "nodev", "mode=0755", "size=1m"]})
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        config["annotations"] = {"enclave.kbs.url": self.kbs.url, "enclave.kbs.ca": self.kbs.ca_file,
                                 "enclave.kbs.resources": f"{RESOURCE}=/run/secrets/greeting", **settings}
        (bundle / "config.json").write_text(json.dumps(config))
        signed = clave("enclave", "sign", "--key", str(key or self.key), str(bundle))
        assert signed.returncode == 0, signed.stderr
        return bundle

    def measure(self, bundle: Path) -> dict[str, str]:
        measured: dict[str, str] = json.loads(clave("enclave", "measure", str(bundle)).stdout)
        return measured

    def allow(self, bundle: Path) -> None:
        """The tenant's resource policy: this app's measurement and signer may read the secret."""
        measured = self.measure(bundle)
        policy = {RESOURCE: [{"tee": ["wasm"], "reference_values": {
            "mrenclave": [measured["mrenclave"]], "mrsigner": [measured["mrsigner"]]}}]}
        path = self.base / "policy.json"
        path.write_text(json.dumps(policy))
        self.admin("set-policy", str(path))

    def admin(self, *args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "clave.kbs.cli", args[0], "--url", self.kbs.url,
                                 "--ca-file", self.kbs.ca_file, "--admin-key", str(self.kbs.material.admin_private),
                                 *args[1:]], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr

    def run(self, bundle: Path, cid: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return clave("--root", str(self.root), "run", *flags, "--bundle", str(bundle), cid)


@pytest.fixture
def story(tmp_path: Path) -> Iterator[Story]:
    try:
        interpreters.PYTHON.module_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    (tmp_path / "kbs").mkdir()
    material = make_material(tmp_path / "kbs")
    # This host's WebAssembly platform key is what the KBS must trust for wasm evidence.
    platform = report.platform_public_pem(report.load_platform_key())
    (material.collateral / "wasm_platform_key.pem").write_bytes(platform)
    kbs = start_kbs(material, tmp_path / "kbs-state", "--allow-insecure")
    s = Story(tmp_path, kbs)
    secret = tmp_path / "greeting.txt"
    secret.write_text("hello, attested world")
    s.admin("put-resource", RESOURCE, str(secret))
    try:
        yield s
    finally:
        if s.root.exists():
            for cid in os.listdir(s.root):
                clave("--root", str(s.root), "delete", "--force", cid)
        stop_kbs(kbs)


def test_attested_app_gets_its_secret_and_a_modified_app_does_not(story: Story) -> None:
    bundle = story.app("good", APP)
    story.allow(bundle)
    result = story.run(bundle, "good")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the app read its secret: hello, attested world\n"
    assert not list((bundle / "rootfs").rglob("greeting"))  # only ever in the container's tmpfs
    releases = [line for line in story.kbs.audit() if line.get("outcome") == "released"]
    assert releases and releases[-1]["resource"] == RESOURCE

    # One byte changed and re-signed by someone else: a valid enclave with another identity. The KBS refuses.
    other_key = story.base / "other.pem"
    clave("enclave", "keygen", "--out", str(other_key))
    forged = story.app("forged", APP.replace("its secret", "its sekret"), key=other_key)
    result = story.run(forged, "forged")
    assert result.returncode != 0 and result.stdout == ""
    assert "kbs: default/key/greeting" in result.stderr and "403" in result.stderr, result.stderr
    assert any(line.get("outcome") != "released" for line in story.kbs.audit()[-2:])

    # One byte changed without re-signing: the enclave never loads, nothing reaches the KBS.
    (bundle / "rootfs" / "app" / "app.py").write_text(APP.replace("its secret", "its secrex"))
    before = len(story.kbs.audit())
    result = story.run(bundle, "tampered")
    assert result.returncode != 0 and "the app's files changed since it was signed" in result.stderr
    assert len(story.kbs.audit()) == before
    assert not story.root.exists() or os.listdir(story.root) == []


def test_attestation_files_and_fetching_into_a_running_container(story: Story) -> None:
    waiter = "import time, os\nwhile not os.path.exists('/run/secrets/later'):\n    time.sleep(0.05)\n" \
             "print(open('/run/secrets/later').read())\nprint(open('/run/secrets/attestation/cert.pem').read()[:27])\n"
    bundle = story.app("later", waiter, **{"enclave.attestation.dir": "/run/secrets/attestation"})
    story.allow(bundle)
    out = story.base / "later.out"
    with open(out, "w") as stdout:
        child = subprocess.Popen([CLAVE, "--root", str(story.root), "run", "--bundle", str(bundle), "later"],
                                 stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 60.0
        import time

        started = time.monotonic()
        while clave("--root", str(story.root), "state", "later").returncode != 0 or \
                json.loads(clave("--root", str(story.root), "state", "later").stdout)["status"] != "running":
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() - started < deadline, "the container did not start"
            time.sleep(0.1)
        refused = clave("--root", str(story.root), "attest", "later", "--kbs", story.kbs.url, "--resource",
                        RESOURCE, "--out", "/app/on-disk")
        assert refused.returncode != 0 and "not on a tmpfs" in refused.stderr
        fetched = clave("--root", str(story.root), "attest", "later", "--kbs", story.kbs.url, "--resource", RESOURCE,
                        "--out", "/run/secrets/later")
        assert fetched.returncode == 0, fetched.stderr
        assert child.wait(60) == 0, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
    assert out.read_text() == "hello, attested world\n-----BEGIN CERTIFICATE-----\n"


def test_clave_attest_kbs_with_the_host_attester(tmp_path: Path) -> None:
    """Without a container id, `clave attest --kbs` attests with this host's attester (here `sample`, allowed
    by the default test policy) and writes the secret to a tmpfs; a disk path is refused before any request."""
    (tmp_path / "kbs").mkdir()
    material = make_material(tmp_path / "kbs")
    kbs = start_kbs(material, tmp_path / "kbs-state", "--allow-insecure")
    try:
        secret = tmp_path / "db.pass"
        secret.write_text("correct horse")
        subprocess.run([sys.executable, "-m", "clave.kbs.cli", "put-resource", "--url", kbs.url, "--ca-file",
                        kbs.ca_file, "--admin-key", str(material.admin_private), "default/key/db", str(secret)],
                       check=True, capture_output=True)
        out = Path("/dev/shm") / f"clave-test-{os.getpid()}"
        fetched = clave("attest", "--attester", "sample", "--kbs", kbs.url, "--kbs-ca", kbs.ca_file, "--resource",
                        "default/key/db", "--out", str(out))
        try:
            assert fetched.returncode == 0, fetched.stderr
            assert out.read_text() == "correct horse" and out.stat().st_mode & 0o777 == 0o400
            assert "INSECURE" in fetched.stderr
        finally:
            out.unlink(missing_ok=True)
        refused = clave("attest", "--attester", "sample", "--kbs", kbs.url, "--kbs-ca", kbs.ca_file, "--resource",
                        "default/key/db", "--out", str(tmp_path / "on-disk"))
        assert refused.returncode == 1 and "is not on a tmpfs mount" in refused.stderr
        assert not (tmp_path / "on-disk").exists()
        bad = clave("attest", "--kbs", kbs.url, "--resource", "default/key/db")
        assert bad.returncode != 0 and "usage: clave attest" in bad.stderr
    finally:
        stop_kbs(kbs)
