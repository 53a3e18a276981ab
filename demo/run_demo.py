"""`make demo`: what Clave does today, on this machine, with no registry and no network.

1. Builds a busybox OCI bundle from Debian's busybox-static.
2. Drives a native container through the OCI lifecycle with the `clave` CLI, exactly as containerd does
   (create → state → start → state → wait → delete), and shows the isolation from inside.
3. Shows `clave run` passing the exit status through, and a bad config failing cleanly.
4. Runs a signed WebAssembly module as an enclave container, shows its measurement and evidence, and shows a
   module changed by one byte being refused.
5. Builds a small Python app image from files and runs it unmodified as a native container (the host's CPython)
   and as an enclave container (CPython for WebAssembly), printing its measurement.
6. The remote-attestation story: a key broker (`clave-kbs`) holds a secret for that app's measurement; the
   enclave container's runtime attests and the app uses the secret; the app changed by one byte is refused (by
   the KBS when re-signed by someone else, at load when not re-signed); a verifier checks the running app
   through the node's relay (`clave-relay`, `clave-verify remote`).
7. Verifies genuine TEE evidence (an SGX quote, an SEV-SNP report) offline with `clave-verify`.
8. Runs the same busybox bundle as a vm container: its own kernel in a lightweight QEMU VM (the guest is built
   from Debian's packages on first use, with progress), the same isolation checks from inside, an exec into it,
   the exit status passed through, and nothing left after delete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
CLAVE = os.path.join(BIN, "clave")
VERIFY = os.path.join(BIN, "clave-verify")
KBS = os.path.join(BIN, "clave-kbs")
APP = """\
import hashlib, sys
print(f"hello from {sys.implementation.name} on {sys.platform}")
if "--use-token" in sys.argv:
    token = open("/run/secrets/api-token").read().strip()
    print(f"  the app read its API token from the KBS: sha256 {hashlib.sha256(token.encode()).hexdigest()[:12]}...")
"""
# The samples the last step verifies, shipped with the demo (demo/testdata/PROVENANCE.md says where they come from).
TESTDATA = os.path.join(REPO, "demo", "testdata")

INSIDE = r"""
echo "  hostname:        $(hostname)"
echo "  my pid:          $$ (pid 1 of its own pid namespace)"
echo "  processes seen:  $(ls /proc | grep -c '^[0-9]')"
echo "  network:         $(ls /sys/class/net | tr '\n' ' ')"
echo "  memory limit:    $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
echo "  capabilities:    $(grep CapEff /proc/self/status | cut -f2)"
mount -t tmpfs x /mnt 2>/dev/null && echo "  mount:           ALLOWED (unexpected)" || echo "  mount:           refused (seccomp + no CAP_SYS_ADMIN)"
[ -n "$(head -c 1 /proc/kcore 2>/dev/null | od -An)" ] && echo "  /proc/kcore:     readable (unexpected)" || echo "  /proc/kcore:     masked"
"""


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def clave(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = [CLAVE, "--root", ROOT, *args]
    print("$ clave " + " ".join(args), flush=True)
    result = subprocess.run(cmd, text=True, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        sys.exit(f"demo failed: clave {' '.join(args)} exited {result.returncode}")
    return result


def make_bundle(workdir: str, args: list[str], memory: int | None = None, name: str = "bundle") -> str:
    from clave.tools.bundles import make_bundle

    bundle = os.path.join(workdir, name)
    config = make_bundle(bundle, args, rootfs=os.path.join(workdir, "rootfs"))
    config["hostname"] = "clave-demo"
    if memory:
        config["linux"]["resources"]["memory"] = {"limit": memory}
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return bundle


def lifecycle(workdir: str) -> None:
    step("A native container through the OCI lifecycle (what containerd's runc shim calls)")
    bundle = make_bundle(workdir, ["sh", "-c", INSIDE], memory=64 * 1024 * 1024)
    pid_file = os.path.join(workdir, "demo.pid")
    clave("create", "--bundle", bundle, "--pid-file", pid_file, "demo")
    state = json.loads(clave("state", "demo", stdout=subprocess.PIPE).stdout)
    print(f"  status={state['status']} pid={state['pid']} (pid file says {open(pid_file).read()})")
    clave("start", "demo")
    deadline = time.monotonic() + 10
    while json.loads(clave("state", "demo", stdout=subprocess.PIPE).stdout)["status"] != "stopped":
        if time.monotonic() > deadline:
            sys.exit("demo failed: the container did not stop")
        time.sleep(0.05)
    clave("delete", "demo")
    print(f"  state dir left behind: {os.path.exists(os.path.join(ROOT, 'demo'))}")


def run_and_errors(workdir: str) -> None:
    step("clave run: create + start + wait + delete, exit status passed through")
    bundle = make_bundle(workdir, ["sh", "-c", "echo hello from a clave container; exit 7"])
    started = time.monotonic()
    result = clave("run", "--bundle", bundle, "hello", check=False)
    print(f"  exit status {result.returncode} in {1000 * (time.monotonic() - started):.0f} ms")

    step("Bad input fails with one line and leaves nothing behind")
    broken = os.path.join(workdir, "broken")
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write('{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "process": {"args": [], "cwd": "/"}}')
    result = clave("create", "--bundle", broken, "broken", check=False, stderr=subprocess.PIPE)
    print(f"  exit {result.returncode}: {result.stderr.strip()}")
    print(f"  state dir left behind: {os.path.exists(os.path.join(ROOT, 'broken'))}")


HELLO_WAT = """(module
 (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (data (i32.const 64) "hello from a WebAssembly enclave\\n")
 (func (export "_start")
  (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 33))
  (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


def enclave(workdir: str) -> None:
    step("An enclave container: a signed WebAssembly module on the built-in runtime (software isolation)")
    import wasmtime

    bundle = os.path.join(workdir, "wasm")
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(os.path.join(rootfs, "app"))
    module = os.path.join(rootfs, "app", "hello.wasm")
    with open(module, "wb") as f:
        f.write(wasmtime.wat2wasm(HELLO_WAT))
    key = os.path.join(workdir, "signer.pem")
    clave("enclave", "keygen", "--out", key, stdout=subprocess.DEVNULL)
    clave("enclave", "sign", "--key", key, module, stdout=subprocess.DEVNULL)
    measured = json.loads(clave("enclave", "measure", module, stdout=subprocess.PIPE).stdout)
    print(f"  mrenclave={measured['mrenclave'][:16]}... mrsigner={measured['mrsigner'][:16]}...")
    from clave.config.defaults import default_spec

    config = default_spec()
    config["process"].update(terminal=False, args=["/app/hello.wasm"])
    config["process"]["env"].append("ENCLAVE_TYPE=wasm")
    config["root"] = {"path": "rootfs", "readonly": True}
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    clave("run", "--bundle", bundle, "enclave", stderr=subprocess.DEVNULL)
    with open(module, "r+b") as f:  # one byte changed: the signature no longer matches
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    result = clave("run", "--bundle", bundle, "tampered", check=False, stderr=subprocess.PIPE)
    refusal = [line for line in result.stderr.splitlines() if "level=warning" not in line]
    print(f"  tampered module: exit {result.returncode}: {refusal[-1] if refusal else ''}")


def python_app(workdir: str) -> str:
    step("An ordinary Python app image, unmodified: natively, then in the WebAssembly enclave (CPython for WASI)")
    from clave.tools.bundles import host_python_mounts, make_app_bundle

    native = os.path.join(workdir, "py-native")
    config = make_app_bundle(native, {"/app/app.py": APP}, ["python3", "app.py"], cwd="/app", enclave=False)
    config["mounts"] += host_python_mounts()  # the image has no CPython of its own: lend it the host's
    with open(os.path.join(native, "config.json"), "w") as f:
        json.dump(config, f)
    clave("run", "--bundle", native, "py-native")
    clave("enclave", "compile", "python")  # once per host: shows its progress
    bundle = os.path.join(workdir, "py-enclave")
    make_app_bundle(bundle, {"/app/app.py": APP}, ["python3", "app.py"], cwd="/app")
    key = os.path.join(workdir, "signer.pem")
    clave("enclave", "sign", "--key", key, bundle, stdout=subprocess.DEVNULL)
    measured = json.loads(clave("enclave", "measure", bundle, stdout=subprocess.PIPE).stdout)
    manifest = measured["manifest"]
    print(f"  mrenclave={measured['mrenclave']}\n  mrsigner={measured['mrsigner']}\n"
          f"  (runtime {manifest['runtime']} {manifest['runtime_sha256'][:12]}..., files "
          f"{manifest['tree_sha256'][:12]}..., args {manifest['args']})")
    clave("run", "--bundle", bundle, "py-enclave", stderr=subprocess.DEVNULL)
    return key


def key_broker(workdir: str, key: str) -> None:
    step("Secrets for attested apps only: clave-kbs releases a token to the app's measurement")
    from clave.attestation import wasm_report as report
    from clave.tools.bundles import make_app_bundle

    kbs_dir = os.path.join(workdir, "kbs")
    os.makedirs(os.path.join(kbs_dir, "collateral"))
    cert, tls_key = os.path.join(kbs_dir, "tls.crt"), os.path.join(kbs_dir, "tls.key")
    admin, admin_pub = os.path.join(kbs_dir, "admin.key"), os.path.join(kbs_dir, "admin.pub")
    subprocess.run([KBS, "tls-cert", cert, tls_key], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([KBS, "keygen", admin, admin_pub], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(kbs_dir, "collateral", "wasm_platform_key.pem"), "wb") as f:
        f.write(report.platform_public_pem(report.load_platform_key()))  # the host key wasm evidence is signed with
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    print(f"$ clave-kbs serve --listen 127.0.0.1:{port} --allow-insecure ...  (wasm evidence is software-only)")
    server = subprocess.Popen([KBS, "serve", "--listen", f"127.0.0.1:{port}", "--cert", cert, "--key", tls_key,
                               "--state", os.path.join(kbs_dir, "state"), "--admin-pubkey", admin_pub,
                               "--collateral", os.path.join(kbs_dir, "collateral"), "--allow-insecure"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        admin_args = ["--url", url, "--ca-file", cert, "--admin-key", admin]
        token = os.path.join(kbs_dir, "api-token")
        with open(token, "w") as f:
            f.write("s3cr3t-api-token")
        subprocess.run([KBS, "put-resource", *admin_args, "default/token/api", token], check=True)
        bundle = os.path.join(workdir, "py-kbs")

        def app_bundle(path: str, source: str, signer: str) -> dict[str, str]:
            config = make_app_bundle(path, {"/app/app.py": source}, ["python3", "app.py", "--use-token"],
                                     cwd="/app")
            config["mounts"].append({"destination": "/run/secrets", "type": "tmpfs", "source": "tmpfs",
                                     "options": ["nosuid", "nodev", "mode=0755", "size=1m"]})
            config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
            config["annotations"] = {"enclave.kbs.url": url, "enclave.kbs.ca": cert,
                                     "enclave.kbs.resources": "default/token/api=/run/secrets/api-token"}
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(config, f)
            clave("enclave", "sign", "--key", signer, path, stdout=subprocess.DEVNULL)
            measured: dict[str, str] = json.loads(clave("enclave", "measure", path, stdout=subprocess.PIPE).stdout)
            return measured

        measured = app_bundle(bundle, APP, key)
        policy = os.path.join(kbs_dir, "policy.json")
        with open(policy, "w") as f:
            json.dump({"default/token/api": [{"tee": ["wasm"], "reference_values": {
                "mrenclave": [measured["mrenclave"]], "mrsigner": [measured["mrsigner"]]}}]}, f)
        subprocess.run([KBS, "set-policy", *admin_args, policy], check=True, stdout=subprocess.DEVNULL)
        print(f"  resource policy: default/token/api for mrenclave {measured['mrenclave'][:16]}... only")
        clave("run", "--bundle", bundle, "py-kbs", stderr=subprocess.DEVNULL)

        forged = os.path.join(workdir, "py-forged")
        other = os.path.join(workdir, "other-signer.pem")
        clave("enclave", "keygen", "--out", other, stdout=subprocess.DEVNULL)
        app_bundle(forged, APP.replace("hello from", "hello frm "), other)
        result = clave("run", "--bundle", forged, "py-forged", check=False, stderr=subprocess.PIPE)
        print(f"  one byte changed, re-signed by another key: exit {result.returncode}: {_last_line(result.stderr)}")
        with open(os.path.join(bundle, "rootfs", "app", "app.py"), "a") as f:
            f.write("#")
        result = clave("run", "--bundle", bundle, "py-tampered", check=False, stderr=subprocess.PIPE)
        print(f"  one byte changed, not re-signed:          exit {result.returncode}: {_last_line(result.stderr)}")
    finally:
        server.terminate()
        server.wait(timeout=10)


def relay(workdir: str, key: str) -> None:
    step("A remote verifier checks the running app through the node's relay (clave-relay, clave-verify remote)")
    from clave.attestation import wasm_report as report
    from clave.tools.bundles import make_app_bundle

    bundle = os.path.join(workdir, "py-service")
    make_app_bundle(bundle, {"/app/service.py": "import time\nprint('serving', flush=True)\ntime.sleep(60)\n"},
                    ["python3", "service.py"], cwd="/app")
    clave("enclave", "sign", "--key", key, bundle, stdout=subprocess.DEVNULL)
    reference = os.path.join(workdir, "service.ref.json")
    with open(reference, "w") as f:
        f.write(clave("enclave", "measure", bundle, stdout=subprocess.PIPE).stdout)
    collateral = os.path.join(workdir, "verifier-collateral")
    os.makedirs(collateral)
    with open(os.path.join(collateral, "wasm_platform_key.pem"), "wb") as f:
        f.write(report.platform_public_pem(report.load_platform_key()))  # the verifier trusts this host's key
    clave("run", "--detach", "--bundle", bundle, "service", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = _free_port()
    print(f"$ clave-relay --listen 127.0.0.1:{port} --root {ROOT} --attester sample   (no TPM or TEE on this host)")
    server = subprocess.Popen([os.path.join(BIN, "clave-relay"), "--listen", f"127.0.0.1:{port}", "--root", ROOT,
                               "--attester", "sample"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        print(f"$ clave-verify remote 127.0.0.1:{port} --container service --reference service.ref.json "
              "--collateral DIR")
        result = subprocess.run([VERIFY, "remote", f"127.0.0.1:{port}", "--container", "service", "--reference",
                                 reference, "--collateral", collateral], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            print(f"  {line}")
        print(f"  exit {result.returncode}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        clave("delete", "--force", "service", check=False)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and "level=warning" not in line]
    return lines[-1] if lines else ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo failed: nothing listens on port {port}")


def attestation() -> None:
    step("Verifying genuine TEE evidence offline (clave-verify)")
    if not os.path.isdir(TESTDATA):
        print(f"  (skipped: no test data at {TESTDATA})")
        return
    samples = [
        ("sgx", "sgx", "dcapqvl_00a067110000", "quote.bin"),
        ("snp", "sev-snp", "microsoft_genoa_v3", "report.bin"),
    ]
    for tee, folder, sample, evidence in samples:
        at = _suggested_now(sample)
        with tempfile.TemporaryDirectory() as collateral:
            for name in os.listdir(os.path.join(TESTDATA, folder)):
                if name.startswith(sample + ".") and not name.endswith(evidence):
                    shutil.copy(os.path.join(TESTDATA, folder, name), os.path.join(collateral, name[len(sample) + 1 :]))
            cmd = [VERIFY, "evidence", os.path.join(TESTDATA, folder, f"{sample}.{evidence}"), "--tee", tee,
                   "--collateral", collateral, "--json"] + (["--at", at] if at else [])
            print(f"$ clave-verify evidence {folder}/{sample}.{evidence} --tee {tee} --collateral ... --at {at}")
            out = subprocess.run(cmd, capture_output=True, text=True)
            verdict = json.loads(out.stdout) if out.stdout.strip() else {"verdict": "error", "reason": out.stderr}
            claims = verdict.get("claims", {})
            keys = ("mrenclave", "mrsigner", "tcb_status") if tee == "sgx" else ("measurement", "chip_id", "tcb_status")
            shown = ", ".join(f"{k}={str(claims.get(k))[:16]}" for k in keys if k in claims)
            print(f"  verdict: {verdict['verdict']}  {shown}")


def _suggested_now(sample: str) -> str | None:
    """The verification time the test data's README gives for a sample (its certificates expire)."""
    with open(os.path.join(TESTDATA, "PROVENANCE.md")) as f:
        for line in f:
            if f"`{sample}`" in line:
                return line.rstrip(" |\n").rsplit("|", 1)[-1].strip()
    return None


def vm(workdir: str) -> None:
    step("A vm container: the same bundle in a lightweight VM with its own kernel (the Kata / runV model)")
    print("$ clave vm build-guest    # Debian's cloud kernel + a small guest image, cached by input digests",
          flush=True)
    built = subprocess.run([CLAVE, "vm", "build-guest"], text=True, stdout=subprocess.PIPE)
    if built.returncode != 0:
        sys.exit("demo failed: clave vm build-guest")
    print(f"  guest digests: {json.dumps(json.loads(built.stdout)['sha256'])[:100]}...")
    check = subprocess.run([CLAVE, "check"], text=True, capture_output=True).stdout
    accel = [line for line in check.splitlines() if line.startswith(("vm_acceleration", "vm_attestation"))]
    for line in accel or ["vm_acceleration: see clave check"]:
        print("  " + line.strip()[:160])
    script = f'echo "  guest kernel:    $(uname -r) (host: {os.uname().release})"\n{INSIDE}\nexit 3'
    bundle = make_bundle(workdir, ["sh", "-c", script],
                         memory=64 << 20, name="vm-bundle")
    t0 = time.monotonic()
    result = clave("--handler", "vm", "run", "--bundle", bundle, "demo-vm", check=False)
    print(f"  exit status {result.returncode} (the guest process's), {time.monotonic() - t0:.1f} s from create to "
          "delete under QEMU's software emulation")
    bundle = make_bundle(workdir, ["sleep", "60"], name="vm-bundle2")
    clave("--handler", "vm", "create", "--bundle", bundle, "demo-vm2")
    clave("start", "demo-vm2")
    clave("exec", "demo-vm2", "sh", "-c", "echo '  exec in the guest: pid 1 is' $(cat /proc/1/comm)")
    state = json.loads(clave("state", "demo-vm2", stdout=subprocess.PIPE).stdout)
    print(f"  state: {state['status']}, pid {state['pid']} (the host stand-in), VM boot "
          f"{state['vm']['boot_seconds']:.1f} s, QEMU RSS {state['vm']['vmm_rss_bytes'] >> 20} MiB")
    clave("delete", "--force", "demo-vm2")
    print("  after delete: " + ("nothing left (no QEMU, VM state or layer)" if not os.listdir(ROOT) else
                                "state left: " + ", ".join(os.listdir(ROOT))))


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("make demo runs containers: run it as root")
    global ROOT
    workdir = tempfile.mkdtemp(prefix="clave-demo-")
    ROOT = os.path.join(workdir, "state")
    try:
        from clave.tools.bundles import make_busybox_rootfs

        step("Building a busybox rootfs from Debian's busybox-static (no registry)")
        make_busybox_rootfs(os.path.join(workdir, "rootfs"))
        print(f"  {workdir}/rootfs")
        lifecycle(workdir)
        run_and_errors(workdir)
        enclave(workdir)
        key = python_app(workdir)
        key_broker(workdir, key)
        relay(workdir, key)
        attestation()
        vm(workdir)
    finally:
        for cid in ("demo", "demo-vm", "demo-vm2"):
            subprocess.run([CLAVE, "--root", ROOT, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nDemo finished.")


ROOT = ""

if __name__ == "__main__":
    main()
