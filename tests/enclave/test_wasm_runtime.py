"""The built-in WebAssembly enclave runtime driven as the enclave handler drives it: prepare (before
pivot_root), init, create_process, exec, kill, destroy. Modules are built from WAT and signed in the tests."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wasmtime")

import _wasm_modules as wat  # noqa: E402

from clave.enclave.runtime import EnclaveError  # noqa: E402
from clave.enclave.wasm import measure  # noqa: E402
from clave.enclave.wasm.runtime import WasmRuntime, resolve_in_root  # noqa: E402

MODULE = "/app/main.wasm"


@dataclass
class Host:
    root: Path
    rootfs: Path
    key: Path

    def runtime(self) -> WasmRuntime:
        return WasmRuntime(cache_dir=str(self.root / "cache"), platform_key_path=str(self.root / "platform.pem"))

    def install(self, source: str, guest_path: str = MODULE, config: dict[str, int | None] | None = None) -> Path:
        return wat.install(self.rootfs, guest_path, source, self.key, config)

    def prepared(self, config: dict[str, Any] | None = None, guest_path: str = MODULE) -> WasmRuntime:
        runtime = self.runtime()
        oci = {"process": {"args": [guest_path], "cwd": "/"}, **(config or {})}
        runtime.prepare(str(self.rootfs), oci)
        runtime.init("", "info")
        return runtime


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    monkeypatch.setenv("CLAVE_WASM_SIGNERS", str(tmp_path / "no-signer-policy"))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    return Host(tmp_path, rootfs, wat.make_key(tmp_path))


def run(runtime: WasmRuntime, argv: list[str] | None = None, env: list[str] | None = None) -> tuple[int, str, str]:
    """Run the entrypoint with stdout and stderr on pipes; returns (exit value, stdout, stderr)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = runtime.create_process(MODULE, argv or [MODULE], env or [], (0, out_w, err_w))
        code = runtime.exec(pid)
    finally:
        os.close(out_w)
        os.close(err_w)
    return code, wat.read_all(out_r).decode(), wat.read_all(err_r).decode()


def test_hello_world_on_stdout_exit_zero(host: Host) -> None:
    host.install(wat.hello())
    code, out, err = run(host.prepared())
    assert (code, out, err) == (0, "hello, enclave\n", "")


@pytest.mark.parametrize("status", [0, 1, 42, 125])  # wasmtime refuses proc_exit codes >= 126
def test_proc_exit_status_is_the_exit_value(host: Host, status: int) -> None:
    host.install(wat.exit_with(status))
    assert run(host.prepared())[0] == status


def test_args_and_env_reach_the_guest(host: Host) -> None:
    host.install(wat.echo_args_and_env())
    code, out, _ = run(host.prepared(), [MODULE, "first", "with space"], ["GREETING=hi", "EMPTY="])
    assert code == 0
    assert out == f"{MODULE}\nfirst\nwith space\nGREETING=hi\nEMPTY=\n"


def test_stdin_from_the_given_fd(host: Host) -> None:
    host.install(wat.echo_stdin())
    runtime = host.prepared()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, b"typed in\n")
    os.close(in_w)
    pid = runtime.create_process(MODULE, [MODULE], [], (in_r, out_w, 2))
    code = runtime.exec(pid)
    os.close(out_w)
    os.close(in_r)
    assert (code, wat.read_all(out_r)) == (0, b"typed in\n")


def test_reads_a_file_from_the_rootfs_preopened_as_root(host: Host) -> None:
    (host.rootfs / "data").mkdir()
    (host.rootfs / "data" / "msg.txt").write_text("from the image\n")
    host.install(wat.cat_file("data/msg.txt"))
    assert run(host.prepared())[:2] == (0, "from the image\n")


def test_cannot_escape_the_preopened_root(host: Host) -> None:
    (host.root / "secret.txt").write_text("host secret")
    host.install(wat.cat_file("../secret.txt"))
    code, out, _ = run(host.prepared())
    assert out == "" and code in (63, 76)  # EPERM or ENOTCAPABLE


def test_readonly_root_refuses_writes(host: Host) -> None:
    host.install(wat.create_file("created.txt"))
    code, _, _ = run(host.prepared({"root": {"path": "rootfs", "readonly": True}}))
    assert code in (63, 69, 76) and not (host.rootfs / "created.txt").exists()  # EPERM, EROFS or ENOTCAPABLE
    host.install(wat.create_file("created.txt"))
    assert run(host.prepared())[0] == 0 and (host.rootfs / "created.txt").exists()


def test_kill_interrupts_a_spinning_guest(host: Host) -> None:
    host.install(wat.spin())
    runtime = host.prepared()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(run=run(runtime)))
    thread.start()
    time.sleep(0.2)
    runtime.kill(-1, signal.SIGWINCH)  # no default action: ignored, the guest keeps running
    time.sleep(0.1)
    assert thread.is_alive()
    runtime.kill(-1, signal.SIGTERM)
    thread.join(5)
    assert not thread.is_alive()
    assert result["run"][0] == -signal.SIGTERM
    runtime.destroy()


def test_kill_of_one_process_leaves_the_others_running(host: Host) -> None:
    host.install(wat.spin())
    runtime = host.prepared()
    first = runtime.create_process(MODULE, [MODULE], [], (0, 1, 2))
    second = runtime.create_process(MODULE, [MODULE], [], (0, 1, 2))
    codes: dict[int, int] = {}
    threads = [threading.Thread(target=lambda p=p: codes.update({p: runtime.exec(p)})) for p in (first, second)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    runtime.kill(second, signal.SIGINT)
    threads[1].join(5)
    assert codes == {second: -signal.SIGINT} and threads[0].is_alive()
    runtime.kill(-1, signal.SIGKILL)
    threads[0].join(5)
    assert codes[first] == -signal.SIGKILL
    with pytest.raises(EnclaveError, match="no enclave process"):
        runtime.kill(first, signal.SIGTERM)


def test_cpu_time_limit_stops_an_infinite_loop(host: Host) -> None:
    host.install(wat.spin())
    config = {"process": {"args": [MODULE], "rlimits": [{"type": "RLIMIT_CPU", "soft": 1, "hard": 2}]}}
    started = time.monotonic()
    code, _, err = run(host.prepared(config))
    assert code == -signal.SIGXCPU and "CPU time limit exceeded" in err
    assert time.monotonic() - started < 10


def test_memory_grow_past_the_cap_fails_cleanly(host: Host) -> None:
    host.install(wat.grow_memory(64))  # 1 + 64 pages of 64 KiB
    assert run(host.prepared())[:2] == (0, "grown\n")
    limited = {"linux": {"resources": {"memory": {"limit": 2 * 1024 * 1024}}}}
    assert run(host.prepared(limited))[:2] == (3, "grow failed\n")


def test_signed_memory_limit_applies_even_without_an_oci_limit(host: Host) -> None:
    host.install(wat.grow_memory(64), config={"memory_limit": 2 * 1024 * 1024, "cpu_time_limit": None})
    runtime = host.prepared()
    assert run(runtime)[:2] == (3, "grow failed\n")
    assert measure.effective_limits({"memory_limit": 10, "cpu_time_limit": None},
                                    {"memory_limit": 5, "cpu_time_limit": 7}) == {"memory_limit": 5,
                                                                                  "cpu_time_limit": 7}


def test_trap_is_an_abort_with_a_message(host: Host) -> None:
    host.install(wat.trap())
    code, _, err = run(host.prepared())
    assert code == -signal.SIGABRT
    assert err.startswith("clave: wasm trap:") and "unreachable" in err and err.count("\n") == 1


def test_unsigned_module_is_refused_at_prepare(host: Host) -> None:
    wat.install(host.rootfs, MODULE, wat.hello(), key=None)
    with pytest.raises(EnclaveError, match=r"^wasm: refused: /app/main.wasm is not signed"):
        host.prepared()


def test_not_a_module_and_missing_module_are_clear_errors(host: Host) -> None:
    with pytest.raises(EnclaveError, match="cannot read the module /app/main.wasm: No such file"):
        host.prepared()
    path = host.rootfs / "app" / "main.wasm"
    path.parent.mkdir()
    path.write_bytes(b"#!/bin/sh\necho not wasm\n")
    from clave.enclave.wasm import signing

    signing.sign_module(str(path), str(host.key))
    with pytest.raises(EnclaveError, match=r"/app/main.wasm is neither a WebAssembly module nor a supported "
                                           r"interpreter \(python, python3, python3.N, node"):
        host.prepared()
    path.write_bytes(b"\0asm" + b"\xff" * 12)  # the magic, then garbage
    signing.sign_module(str(path), str(host.key))
    with pytest.raises(EnclaveError, match="is not a valid WebAssembly module"):
        host.prepared()


def test_relative_path_and_symlinks_resolve_inside_the_rootfs(host: Host) -> None:
    host.install(wat.hello("via link\n"), guest_path="/opt/real.wasm")
    (host.rootfs / "app").mkdir()
    os.symlink("/opt/real.wasm", host.rootfs / "app" / "main.wasm")
    assert resolve_in_root(str(host.rootfs), "/app/main.wasm") == str(host.rootfs / "opt" / "real.wasm")
    os.symlink("../../../../etc/passwd", host.rootfs / "escape")
    assert resolve_in_root(str(host.rootfs), "escape") == str(host.rootfs / "etc" / "passwd")
    runtime = host.runtime()
    runtime.prepare(str(host.rootfs), {"process": {"args": ["main.wasm"], "cwd": "/app"}})
    runtime.init("", "info")
    out_r, out_w = os.pipe()
    pid = runtime.create_process("main.wasm", ["main.wasm"], [], (0, out_w, 2))
    assert runtime.exec(pid) == 0
    os.close(out_w)
    assert wat.read_all(out_r) == b"via link\n"


def test_measurement_and_local_report(host: Host) -> None:
    from clave.attestation import wasm_report as report

    host.install(wat.hello())
    runtime = host.prepared()
    identity = runtime.measurement()
    wasm = (host.rootfs / "app" / "main.wasm").read_bytes()
    assert identity["mrenclave"] == measure.mrenclave(measure.module_digest(wasm),
                                                      measure.enclave_config(None)).hex()
    fields, _, _ = report.parse_report(runtime.local_report(b"target", b"\x01" * 64))
    assert fields["mrenclave"].hex() == identity["mrenclave"] and fields["mrsigner"].hex() == identity["mrsigner"]
    assert fields["report_data"] == b"\x01" * 64 and fields["target_info"] == b"target"
    with pytest.raises(EnclaveError, match="at most 64"):
        runtime.local_report(b"", b"x" * 65)


CHROOTED_CHILD = """
import os, sys
from clave.enclave.wasm.runtime import WasmRuntime
root, rootfs, module = sys.argv[1:]
runtime = WasmRuntime(cache_dir=root + "/cache", platform_key_path=root + "/platform.pem")
runtime.prepare(rootfs, {"process": {"args": [module]}})
assert len(os.listdir("/proc/self/task")) == 1, "prepare() started threads"
os.chroot(rootfs)
os.chdir("/")
runtime.init("", "info")
status = runtime.exec(runtime.create_process(module, [module], [], (0, 1, 2)))
status |= runtime.exec(runtime.create_process("/app/second.wasm", ["second"], [], (0, 1, 2)))  # as `clave exec`
runtime.destroy()
sys.exit(status & 0xFF)
"""


def test_after_chroot_the_rootfs_is_the_root_and_stdio_is_inherited(host: Host) -> None:
    """As in a container: prepare with host paths, then the root changes, then the process runs on fds 0-2.
    A fresh interpreter: forking this one (which has run wasmtime's threads) could deadlock."""
    import subprocess
    import sys

    (host.rootfs / "etc").mkdir()
    (host.rootfs / "etc" / "hostname").write_text("enclave-host\n")
    host.install(wat.cat_file("etc/hostname"))
    host.install(wat.hello("second\n"), guest_path="/app/second.wasm")
    lookalike = host.rootfs / str(host.root / "cache").lstrip("/")  # the cache's path, inside the container
    lookalike.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", CHROOTED_CHILD, str(host.root), str(host.rootfs), MODULE],
                          capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"enclave-host\nsecond\n", b"")
    # after the root changed, the runtime neither read nor wrote a cache inside the container
    assert list(lookalike.iterdir()) == []
