"""Language-runtime enclaves through `clave run`: an image's `python3 app.py` or `node app.js` runs unmodified in
the WebAssembly enclave, measured over the runtime, the image's files and the arguments, signed, limited, and
refused with one line when anything was changed after signing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_clave

pytest.importorskip("wasmtime")

from clave.enclave.wasm import interpreters  # noqa: E402
from clave.tools import bundles  # noqa: E402

BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root"),
    pytest.mark.skipif(not os.path.exists(bundles.BUSYBOX), reason="needs busybox-static"),
]

APP = """\
import os, sys
print("argv", sys.argv[1:], "cwd", os.getcwd(), "greeting", os.environ.get("GREETING"))
print(open("data.txt").read().strip())
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""
JS_APP = """\
// std and os are globals under --std (QuickJS-ng also has them as the modules "qjs:std" and "qjs:os")
console.log("js argv", scriptArgs.slice(1).join(","), "greeting", std.getenv("GREETING"));
std.exit(Number(scriptArgs[1] || 0));
"""


def _require(language: interpreters.LanguageRuntime) -> None:
    try:
        language.module_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


class App:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.bundle = base / "bundle"
        self.rootfs = self.bundle / "rootfs"
        self.root = base / "state"
        self.key = base / "signer.pem"
        self.env: dict[str, str] = {}
        subprocess.run([str(BIN / "clave"), "enclave", "keygen", "--out", str(self.key)], check=True,
                       capture_output=True)

    def make(self, files: dict[str, str | bytes], args: list[str], cwd: str = "/app", env: tuple[str, ...] = (),
             sign: bool = True, **config: object) -> None:
        oci = bundles.make_app_bundle(str(self.bundle), files, args, cwd=cwd, env=env)
        for key, value in config.items():
            section, _, name = key.partition("__")
            oci[section][name] = value
        (self.bundle / "config.json").write_text(json.dumps(oci))
        if sign:
            result = self.clave("enclave", "sign", "--key", str(self.key), str(self.bundle))
            assert result.returncode == 0, result.stderr

    def clave(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_clave(*args, root=self.root, cwd=self.bundle, timeout=timeout, env=self.env)

    def measure(self) -> dict[str, object]:
        result = self.clave("enclave", "measure", str(self.bundle))
        assert result.returncode == 0, result.stderr
        measured: dict[str, object] = json.loads(result.stdout)
        return measured

    def assert_clean(self) -> None:
        assert not self.root.exists() or os.listdir(self.root) == []


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    _require(interpreters.PYTHON)
    a = App(tmp_path)
    yield a
    if a.root.exists():
        for cid in os.listdir(a.root):
            a.clave("delete", "--force", cid)


def test_python_app_runs_with_args_env_cwd_files_and_exit_status(app: App) -> None:
    app.make({"/app/app.py": APP, "/app/data.txt": "a data file\n"}, ["python3", "app.py", "7"],
             env=("GREETING=hello",))
    result = app.clave("run", "py")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "argv ['7'] cwd /app greeting hello\na data file\n"
    app.assert_clean()


def test_python_module_and_command_forms(app: App) -> None:
    files = {"/app/pkg/__init__.py": "", "/app/pkg/__main__.py": "import sys\nprint('pkg', sys.argv[1:])\n",
             "/app/data.txt": ""}
    app.make(files, ["/usr/bin/python3", "-m", "pkg", "x"])
    result = app.clave("run", "pym")
    assert (result.returncode, result.stdout) == (0, "pkg ['x']\n"), result.stderr
    app.make(files, ["python3.12", "-c", "import sys; print(sys.version_info[:2]); sys.exit(3)"])
    result = app.clave("run", "pyc")
    assert (result.returncode, result.stdout) == (3, "(3, 12)\n"), result.stderr


def test_javascript_app_runs_as_node_or_qjs(app: App) -> None:
    _require(interpreters.JAVASCRIPT)
    for command in ("node", "qjs"):
        app.make({"/app/app.js": JS_APP}, [command, "app.js", "5"], env=("GREETING=hey",))
        result = app.clave("run", f"js-{command}")
        assert result.returncode == 5, result.stderr
        assert result.stdout == "js argv 5 greeting hey\n"
    app.assert_clean()


def test_root_is_read_only_unless_a_mount_makes_a_directory_writable(app: App, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    script = """\
import sys
try:
    open("/app/new.txt", "w")
except OSError as exc:
    print("image:", type(exc).__name__)
with open("/data/out.txt", "w") as f:
    f.write("written in the enclave")
"""
    app.make({"/app/app.py": script}, ["python3", "app.py"])
    oci = json.loads((app.bundle / "config.json").read_text())
    oci["root"]["readonly"] = False  # the measured image is read-only for the app all the same
    oci["mounts"].append({"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "rw"]})
    (app.bundle / "config.json").write_text(json.dumps(oci))
    result = app.clave("run", "rw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("image: ") and "Error" in result.stdout
    assert (data / "out.txt").read_text() == "written in the enclave"
    assert not (app.rootfs / "app" / "new.txt").exists()


def test_unsupported_entrypoint_is_refused_naming_what_is_supported(app: App) -> None:
    app.make({"/app/app.py": APP}, ["/bin/sh", "-c", "echo native"], sign=False)
    result = app.clave("run", "sh")
    assert result.returncode != 0
    assert "/bin/sh is neither a WebAssembly module nor a supported interpreter (python, python3" in result.stderr
    assert result.stdout == ""
    app.assert_clean()


def test_unsigned_and_modified_apps_are_refused_and_leave_nothing(app: App) -> None:
    app.make({"/app/app.py": APP, "/app/data.txt": "x\n"}, ["python3", "app.py"], sign=False)
    result = app.clave("run", "unsigned")
    assert result.returncode != 0 and "is not signed (no /.clave/enclave.sig in the image)" in result.stderr
    app.assert_clean()
    app.make({"/app/app.py": APP, "/app/data.txt": "x\n"}, ["python3", "app.py"])
    assert app.clave("run", "signed").returncode == 0
    (app.rootfs / "app" / "app.py").write_text(APP.replace("argv", "argw"))  # one byte
    result = app.clave("run", "modified")
    assert result.returncode != 0
    assert "does not match its signature: the app's files changed since it was signed" in result.stderr
    assert result.stdout == ""
    app.assert_clean()
    app.make({"/app/app.py": APP, "/app/data.txt": "x\n"}, ["python3", "app.py", "1"])
    oci = json.loads((app.bundle / "config.json").read_text())
    oci["process"]["args"] = ["python3", "app.py", "2"]
    (app.bundle / "config.json").write_text(json.dumps(oci))
    result = app.clave("run", "args")
    assert result.returncode != 0 and "the arguments changed since it was signed" in result.stderr
    app.assert_clean()


def test_measurement_covers_the_app_and_matches_the_running_enclave(app: App) -> None:
    app.make({"/app/app.py": "import time\ntime.sleep(30)\n"}, ["python3", "app.py"])
    before = app.measure()
    assert before["mrsigner"] and len(str(before["mrenclave"])) == 64
    result = app.clave("run", "--detach", "m")
    assert result.returncode == 0, result.stderr
    try:
        attested = json.loads(app.clave("attest", "m", "--nonce", "00" * 8).stdout)
        assert attested["measurement"] == {"mrenclave": before["mrenclave"], "mrsigner": before["mrsigner"]}
        # An RA-TLS certificate from the running enclave, checked against the measured reference values.
        cert = app.clave("attest", "m", "--nonce", "ab" * 16, "--format", "cert")
        assert cert.returncode == 0 and "INSECURE" in cert.stderr, cert.stderr
        pem = app.base / "enclave.pem"
        pem.write_text(cert.stdout.split("-----BEGIN PRIVATE KEY-----")[0])
        collateral = app.base / "collateral"
        collateral.mkdir()
        from clave.attestation import wasm_report as report

        (collateral / "wasm_platform_key.pem").write_bytes(report.platform_public_pem(report.load_platform_key()))
        policy = app.base / "policy.json"
        policy.write_text(json.dumps({"reference_values": {"mrenclave": [before["mrenclave"]]}}))
        verdict = subprocess.run([str(BIN / "clave-verify"), "cert", str(pem), "--nonce", "ab" * 16, "--collateral",
                                  str(collateral), "--policy", str(policy), "--json"], capture_output=True, text=True)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        assert json.loads(verdict.stdout)["claims"]["mrenclave"] == before["mrenclave"]
        stale = subprocess.run([str(BIN / "clave-verify"), "cert", str(pem), "--nonce", "cd" * 16, "--collateral",
                                str(collateral), "--policy", str(policy), "--json"], capture_output=True, text=True)
        assert stale.returncode != 0 and json.loads(stale.stdout)["layer"] == "freshness"
    finally:
        app.clave("delete", "--force", "m")
    (app.rootfs / "app" / "app.py").write_text("import time\ntime.sleep(31)\n")
    after = json.loads(app.clave("enclave", "measure", str(app.bundle)).stdout or "{}")
    assert after == {}  # the signature no longer matches: measure says so instead of printing
    assert "the app's files changed" in app.clave("enclave", "measure", str(app.bundle)).stderr
    (app.rootfs / ".clave" / "enclave.sig").unlink()
    unsigned = app.measure()
    assert unsigned["mrsigner"] is None and unsigned["mrenclave"] != before["mrenclave"]


def test_memory_and_cpu_time_limits_apply(app: App) -> None:
    hog = "data = bytearray(512 * 1024 * 1024)\nprint('allocated')\n"
    app.make({"/app/app.py": hog}, ["python3", "app.py"])
    oci = json.loads((app.bundle / "config.json").read_text())
    oci["linux"]["resources"]["memory"] = {"limit": 256 * 1024 * 1024}
    (app.bundle / "config.json").write_text(json.dumps(oci))
    result = app.clave("run", "mem")
    assert result.returncode == 1 and "MemoryError" in result.stderr and result.stdout == ""
    app.make({"/app/app.py": "while True:\n    pass\n"}, ["python3", "app.py"],
             process__rlimits=[{"type": "RLIMIT_CPU", "soft": 1, "hard": 10}])
    started = time.monotonic()
    result = app.clave("run", "cpu")
    assert result.returncode == 128 + 24, result.stderr  # SIGXCPU, as for a native process
    assert time.monotonic() - started < 20
    app.assert_clean()


def test_what_wasi_cannot_do_fails_with_a_clear_error(app: App) -> None:
    script = """\
import sys
for what, attempt in [("socket", "import socket; socket.create_connection(('127.0.0.1', 80))"),
                      ("thread", "import threading; threading.Thread(target=print).start()"),
                      ("subprocess", "import subprocess; subprocess.run(['true'])")]:
    try:
        exec(attempt)
        print(what, "worked")
    except Exception as exc:
        print(what, "failed:", type(exc).__name__)
"""
    app.make({"/app/app.py": script}, ["python3", "app.py"])
    result = app.clave("run", "wasi")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["socket", "thread", "subprocess"]
    assert all(" failed: " in line for line in lines), lines


def test_concurrent_cold_starts_compile_once(app: App, tmp_path: Path) -> None:
    _require(interpreters.JAVASCRIPT)
    app.env["CLAVE_WASM_CACHE"] = str(tmp_path / "cache")
    app.make({"/app/app.js": JS_APP}, ["qjs", "app.js", "0"])
    children = []
    for i in range(3):
        out = tempfile.TemporaryFile("w+")
        child = subprocess.Popen([str(BIN / "clave"), "--root", str(app.root), "run", f"cold{i}"], cwd=app.bundle,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **app.env})
        children.append((child, out))
    for child, out in children:
        assert child.wait(120) == 0, child.stderr.read() if child.stderr else ""
        out.seek(0)
        assert out.read() == "js argv 0 greeting undefined\n"
    compiled = [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".cwasm"]
    assert len(compiled) == 1
    notices = [child.stderr.read() if child.stderr else "" for child, _ in children]
    assert sum("compiled quickjs.wasm" in n for n in notices) >= 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]
    app.assert_clean()


def test_clave_check_reports_the_language_runtimes(app: App) -> None:
    app.make({"/app/app.py": "print('x')\n"}, ["python3", "app.py"])
    assert app.clave("run", "warm").returncode == 0  # compiled by now
    report = json.loads(app.clave("check", "--format", "json").stdout)
    python = report["language_runtimes"]["python"]
    assert python.startswith("supported (") and python.endswith("; compiled)")
    assert interpreters.PYTHON.module_path() in python


@pytest.mark.parametrize(("annotations", "error"), [
    ({"enclave.kbs.resources": "default/key/x=/run/secrets/x"}, "enclave.kbs.resources needs enclave.kbs.url"),
    ({"enclave.kbs.url": "https://127.0.0.1:1", "enclave.kbs.resources": "default/key=/x"},
     "'default/key=/x' is not repo/type/tag=/absolute/path"),
    ({"enclave.kbs.url": "https://127.0.0.1:1", "enclave.kbs.ca": "ca.pem"}, "must be an absolute, normalised"),
    ({"enclave.kbs.url": "https://127.0.0.1:1", "enclave.kbs.ca": "/etc"}, "/etc is not a certificate file"),
    ({"enclave.kbs.url": "https://127.0.0.1:1", "enclave.kbs.ca": "/nonexistent/ca.pem"}, "No such file"),
])
def test_bad_provisioning_settings_fail_with_one_line_and_leave_nothing(app: App, annotations: dict[str, str],
                                                                       error: str) -> None:
    app.make({"/app/app.py": "print('never')\n"}, ["python3", "app.py"])
    oci = json.loads((app.bundle / "config.json").read_text())
    oci["annotations"] = annotations
    (app.bundle / "config.json").write_text(json.dumps(oci))
    result = app.clave("run", "bad")
    assert result.returncode != 0 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if "level=warning" not in line]
    assert len(lines) == 1 and error in lines[0], result.stderr
    app.assert_clean()
