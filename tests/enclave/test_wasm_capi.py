"""capi, the enclave's own binding to wasmtime's C API: compile, cache round trips, WASI settings, exits, traps,
epoch interruption, limits, and that it never imports the wasmtime package. Modules are built from WAT with
wasmtime-py (tests only)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("wasmtime")

import _wasm_modules as wat  # noqa: E402
import wasmtime  # noqa: E402

from clave.enclave.wasm import capi, compiler  # noqa: E402

WASM_PAGE = 65536

# Writes "hello" to stdout, then exits with fd_write's WASI errno, or with 100 + the bytes written.
WRITE_STATUS = """(module
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
 (memory (export "memory") 1)
 (data (i32.const 64) "hello")
 (func (export "_start") (local $err i32)
  (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 5))
  (local.set $err (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
  (if (local.get $err) (then (call $exit (local.get $err))))
  (call $exit (i32.add (i32.const 100) (i32.load (i32.const 8))))))"""


@pytest.fixture(scope="module")
def engine() -> capi.Engine:
    return compiler.new_engine()


def compiled(engine: capi.Engine, source: str) -> capi.Module:
    return capi.Module(engine, wasmtime.wat2wasm(source))


class Guest:
    """One run of a module's _start, its stdout and stderr captured through the custom output callbacks."""

    def __init__(self, engine: capi.Engine, module: capi.Module, wasi: capi.WasiConfig | None = None,
                 memory_limit: int | None = None) -> None:
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        wasi = wasi or capi.WasiConfig()
        wasi.set_stdout(self.stdout.append)
        wasi.set_stderr(self.stderr.append)
        self.store = capi.Store(engine, wasi)
        self.store.set_epoch_deadline(1)
        if memory_limit is not None:
            self.store.set_memory_limit(memory_limit)
        linker = capi.Linker(engine)
        linker.define_wasi()
        self.instance = linker.instantiate(self.store, module)

    def run(self) -> int:
        """The exit status: 0 when _start returns, the code of proc_exit otherwise."""
        start = self.instance.get_func(self.store, "_start")
        assert start is not None
        try:
            start.call(self.store)
        except capi.Exit as exc:
            return exc.code
        return 0

    @property
    def out(self) -> str:
        return b"".join(self.stdout).decode()


def run(engine: capi.Engine, source: str, wasi: capi.WasiConfig | None = None, memory_limit: int | None = None
        ) -> tuple[int, str]:
    """Compile and run ``source``: (exit status, stdout)."""
    guest = Guest(engine, compiled(engine, source), wasi, memory_limit)
    return guest.run(), guest.out


def assert_one_line(exc: capi.WasmtimeError) -> None:
    assert str(exc) and "\n" not in str(exc) and "\n" not in exc.cause


def test_hello_on_a_custom_stdout(engine: capi.Engine) -> None:
    guest = Guest(engine, compiled(engine, wat.hello()))
    assert (guest.run(), guest.out, guest.stderr) == (0, "hello, enclave\n", [])


def test_argv_and_env(engine: capi.Engine) -> None:
    wasi = capi.WasiConfig()
    wasi.set_argv(["main.wasm", "two words", "ünïcode"])
    wasi.set_env([("A", "1"), ("EMPTY", ""), ("EQ", "x=y")])
    assert run(engine, wat.echo_args_and_env(), wasi=wasi)[1] == "main.wasm\ntwo words\nünïcode\nA=1\nEMPTY=\nEQ=x=y\n"


def test_an_argument_that_is_not_utf8_is_refused(engine: capi.Engine) -> None:
    with pytest.raises(capi.WasmtimeError, match="not valid UTF-8") as info:
        capi.WasiConfig().set_argv([os.fsdecode(b"\xff")])
    assert_one_line(info.value)


def test_stdin_from_a_file(engine: capi.Engine, tmp_path: Path) -> None:
    (tmp_path / "input").write_text("from the file\n")
    wasi = capi.WasiConfig()
    wasi.set_stdin_file(str(tmp_path / "input"))
    assert run(engine, wat.echo_stdin(), wasi=wasi) == (0, "from the file\n")
    with pytest.raises(capi.WasmtimeError, match="cannot open .*missing as the WASI stdin"):
        capi.WasiConfig().set_stdin_file(str(tmp_path / "missing"))


@pytest.mark.parametrize("code", [1, 42, 125])
def test_proc_exit_is_an_exit_with_its_code(engine: capi.Engine, code: int) -> None:
    assert run(engine, wat.exit_with(code)) == (code, "")


def test_proc_exit_above_125_is_an_error_not_an_exit(engine: capi.Engine) -> None:
    guest = Guest(engine, compiled(engine, wat.exit_with(200)))
    with pytest.raises(capi.WasmtimeError) as info:
        guest.run()
    assert not isinstance(info.value, capi.Exit)
    assert_one_line(info.value)
    assert "exit status" in str(info.value)


def test_a_trap_is_one_line_and_not_an_interruption(engine: capi.Engine) -> None:
    guest = Guest(engine, compiled(engine, wat.trap()))
    with pytest.raises(capi.Trap) as info:
        guest.run()
    assert not info.value.interrupted
    assert_one_line(info.value)
    assert str(info.value) == "wasm trap: wasm `unreachable` instruction executed"
    assert info.value.cause == "wasm `unreachable` instruction executed"
    assert "backtrace" in info.value.detail  # wasmtime's full message stays available


def test_epoch_interruption_from_another_thread(engine: capi.Engine) -> None:
    own_engine = compiler.new_engine()  # incrementing the shared engine's epoch would end other tests' guests
    guest = Guest(own_engine, compiled(own_engine, wat.spin()))
    timer = threading.Timer(0.1, own_engine.increment_epoch)
    timer.start()
    try:
        with pytest.raises(capi.Trap) as info:
            guest.run()
    finally:
        timer.cancel()
    assert info.value.interrupted
    assert info.value.cause == "interrupt"


def test_memory_limit_makes_memory_grow_fail(engine: capi.Engine) -> None:
    assert run(engine, wat.grow_memory(4), memory_limit=2 * WASM_PAGE) == (3, "grow failed\n")
    assert run(engine, wat.grow_memory(4), memory_limit=8 * WASM_PAGE) == (0, "grown\n")
    assert run(engine, wat.grow_memory(4)) == (0, "grown\n")


@pytest.mark.parametrize(("write", "status"), [
    (lambda data: None, 105),  # None: all written
    (lambda data: 3, 105),  # partial writes: wasmtime writes the rest
    (lambda data: 99, 105),  # more than it was given: clamped (wasmtime would abort the process)
    (lambda data: (_ for _ in ()).throw(BrokenPipeError(errno.EPIPE, "closed")), 64),  # WASI EPIPE
    (lambda data: 1 // 0, 29),  # any other exception: WASI EIO, not an exception in wasmtime's thread
])
def test_custom_stdout_results(engine: capi.Engine, write: Callable[[bytes], int | None], status: int) -> None:
    wasi = capi.WasiConfig()
    wasi.set_stdout(write)
    store = capi.Store(engine, wasi)
    store.set_epoch_deadline(1)  # an engine with epoch interruption traps at once otherwise
    linker = capi.Linker(engine)
    linker.define_wasi()
    start = linker.instantiate(store, compiled(engine, WRITE_STATUS)).get_func(store, "_start")
    assert start is not None
    with pytest.raises(capi.Exit) as info:
        start.call(store)
    assert info.value.code == status


def test_preopen_read_only_and_mutable(engine: capi.Engine, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("readable\n")
    read_only = capi.WasiConfig()
    read_only.preopen_dir(str(tmp_path), "/", mutable=False)
    assert run(engine, wat.cat_file("file"), wasi=read_only) == (0, "readable\n")
    read_only = capi.WasiConfig()
    read_only.preopen_dir(str(tmp_path), "/", mutable=False)
    assert run(engine, wat.create_file("new"), wasi=read_only)[0] != 0  # a WASI errno
    assert not (tmp_path / "new").exists()
    mutable = capi.WasiConfig()
    mutable.preopen_dir(str(tmp_path), "/", mutable=True)
    assert run(engine, wat.create_file("new"), wasi=mutable) == (0, "")
    assert (tmp_path / "new").exists()
    with pytest.raises(capi.WasmtimeError, match="cannot preopen .*missing as /"):
        capi.WasiConfig().preopen_dir(str(tmp_path / "missing"), "/", mutable=False)


def test_serialize_deserialize_and_deserialize_file(engine: capi.Engine, tmp_path: Path) -> None:
    serialized = compiled(engine, wat.hello("cached\n")).serialize()
    assert isinstance(serialized, bytes)
    assert run_module(engine, capi.Module.deserialize(engine, serialized)) == "cached\n"
    (tmp_path / "module.cwasm").write_bytes(serialized)
    fd = os.open(tmp_path / "module.cwasm", os.O_RDONLY)
    try:
        module = capi.Module.deserialize_file(engine, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    assert run_module(engine, module) == "cached\n"  # still mapped after the descriptor is closed


def run_module(engine: capi.Engine, module: capi.Module) -> str:
    guest = Guest(engine, module)
    assert guest.run() == 0
    return guest.out


def test_an_engine_configured_differently_refuses_the_serialized_module(engine: capi.Engine) -> None:
    other = capi.Engine(epoch_interruption=False)
    serialized = compiled(other, wat.hello()).serialize()
    with pytest.raises(capi.WasmtimeError) as info:
        capi.Module.deserialize(engine, serialized)
    assert_one_line(info.value)


@pytest.mark.parametrize("load", [
    lambda engine: capi.Module(engine, b"\0asm\x01\0\0\0\x05"),
    lambda engine: capi.Module(engine, b"not wasm at all"),
    lambda engine: capi.Module.deserialize(engine, b"not a compiled module"),
    lambda engine: capi.Module.deserialize_file(engine, "/nonexistent/module.cwasm"),
])
def test_load_errors_are_one_line(engine: capi.Engine, load: Callable[[capi.Engine], object]) -> None:
    with pytest.raises(capi.WasmtimeError) as info:
        load(engine)
    assert_one_line(info.value)
    assert not isinstance(info.value, (capi.Exit, capi.Trap))


def test_compile_error_message(engine: capi.Engine) -> None:
    with pytest.raises(capi.WasmtimeError) as info:
        capi.Module(engine, b"\0asm\x01\0\0\0\x05")
    assert str(info.value) == "failed to parse WebAssembly module: unexpected end-of-file (at offset 0x9)"
    assert info.value.cause == "unexpected end-of-file (at offset 0x9)"


def test_unknown_import_is_an_instantiation_error(engine: capi.Engine) -> None:
    store = capi.Store(engine)
    linker = capi.Linker(engine)
    linker.define_wasi()
    with pytest.raises(capi.WasmtimeError, match=r"^unknown import: `env::missing` has not been defined$"):
        linker.instantiate(store, compiled(engine, '(module (import "env" "missing" (func)))'))


def test_a_trap_in_the_start_function_is_raised_by_instantiate(engine: capi.Engine) -> None:
    with pytest.raises(capi.Trap, match="unreachable"):
        Guest(engine, compiled(engine, "(module (func $boom unreachable) (start $boom))"))


def test_get_func_is_none_for_a_missing_export_or_another_kind(engine: capi.Engine) -> None:
    guest = Guest(engine, compiled(engine, wat.hello()))
    assert guest.instance.get_func(guest.store, "memory") is None
    assert guest.instance.get_func(guest.store, "main") is None
    assert guest.instance.get_func(guest.store, "_start") is not None


def test_closed_objects_refuse_use(engine: capi.Engine) -> None:
    module = compiled(engine, wat.hello())
    module.close()
    module.close()  # idempotent
    with pytest.raises(capi.WasmtimeError, match="Module is closed"):
        module.serialize()
    wasi = capi.WasiConfig()
    capi.Store(engine, wasi)  # the store took the WASI settings over
    with pytest.raises(capi.WasmtimeError, match="WasiConfig is closed"):
        wasi.inherit_stdin()


def test_unknown_optimization_level() -> None:
    with pytest.raises(capi.WasmtimeError, match="unknown optimization level 'fast'"):
        capi.Engine(opt_level="fast")


CHILD = """
import sys
before = set(sys.modules)
from clave.enclave.wasm import capi
engine = capi.Engine(epoch_interruption=True)
with open(sys.argv[1], "rb") as f:
    module = capi.Module(engine, f.read())
out = []
wasi = capi.WasiConfig()
wasi.set_stdout(out.append)
store = capi.Store(engine, wasi)
store.set_epoch_deadline(1)
linker = capi.Linker(engine)
linker.define_wasi()
linker.instantiate(store, module).get_func(store, "_start").call(store)
assert out == [b"no package\\n"], out
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_no_wasmtime_package_is_imported(tmp_path: Path) -> None:
    (tmp_path / "hello.wasm").write_bytes(wasmtime.wat2wasm(wat.hello("no package\n")))
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "hello.wasm")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = set(done.stdout.split())
    assert "clave.enclave.wasm.capi" in imported
    assert not {name for name in imported if name == "wasmtime" or name.startswith("wasmtime.")}
    assert not imported & {"typing", "enum", "dataclasses", "pathlib", "platform"}


RUNTIME_CHILD = """
import os, sys
from clave.enclave.wasm import runtime as wasm_runtime
root, rootfs = sys.argv[1:]
wasm_runtime.preload()
runtime = wasm_runtime.WasmRuntime(cache_dir=root + "/cache", platform_key_path=root + "/platform.pem")
runtime.prepare(rootfs, {"process": {"args": ["/app/main.wasm"]}})
runtime.init("", "info")
status = runtime.exec(runtime.create_process("/app/main.wasm", ["main.wasm"], [], (0, 1, 2)))
assert not [name for name in sys.modules if name.split(".")[0] == "wasmtime"], "the wasmtime package was imported"
sys.exit(status)
"""


@pytest.mark.parametrize("cached", [False, True])
def test_the_runtime_never_imports_the_wasmtime_package(tmp_path: Path, cached: bool) -> None:
    """What a container's init does (preload, prepare, run a process), compiling then loading from the cache."""
    rootfs = tmp_path / "rootfs"
    wat.install(rootfs, "/app/main.wasm", wat.hello("from the runtime\n"), wat.make_key(tmp_path))
    env = {**os.environ, "CLAVE_WASM_SIGNERS": str(tmp_path / "no-signer-policy")}
    for _ in range(2 if cached else 1):
        done = subprocess.run([sys.executable, "-c", RUNTIME_CHILD, str(tmp_path), str(rootfs)], capture_output=True,
                              env=env, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"from the runtime\n", b"")


def test_the_installed_major_is_read_from_the_dist_info(tmp_path: Path) -> None:
    (tmp_path / "wasmtime").mkdir()
    assert capi.installed_major(str(tmp_path / "wasmtime")) is None
    (tmp_path / "wasmtime-51.0.0.dist-info").mkdir()
    assert capi.installed_major(str(tmp_path / "wasmtime")) == 51 != capi.API_MAJOR
    assert capi.installed_major(capi.package_dir() or "") == capi.API_MAJOR
