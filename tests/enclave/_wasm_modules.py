"""WASI test modules written in WAT, and helpers that sign them into a rootfs. Shared by the wasm tests."""

from __future__ import annotations

import os
from pathlib import Path

import wasmtime

from clave.enclave.wasm import signing

_IMPORTS = """
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
 (memory (export "memory") 1)
 (func $print (param $ptr i32) (param $len i32)
  (i32.store (i32.const 0) (local.get $ptr)) (i32.store (i32.const 4) (local.get $len))
  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
"""


def _wat_string(text: str) -> str:
    return "".join(f"\\{b:02x}" for b in text.encode())


def hello(text: str = "hello, enclave\n") -> str:
    return f"""(module {_IMPORTS}
 (data (i32.const 64) "{_wat_string(text)}")
 (func (export "_start") (call $print (i32.const 64) (i32.const {len(text.encode())}))))"""


def exit_with(code: int) -> str:
    return f"""(module {_IMPORTS}
 (func (export "_start") (call $exit (i32.const {code}))))"""


def echo_args_and_env() -> str:
    """Prints every argument, then every environment entry, one per line."""
    return f"""(module
 (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
 {_IMPORTS}
 (func $nul_to_newline (param $ptr i32) (param $len i32) (local $i i32)
  (block $done (loop $next
   (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
   (if (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
    (then (i32.store8 (i32.add (local.get $ptr) (local.get $i)) (i32.const 10))))
   (local.set $i (i32.add (local.get $i) (i32.const 1)))
   (br $next))))
 (func (export "_start")
  (drop (call $args_sizes (i32.const 16) (i32.const 20)))
  (drop (call $args_get (i32.const 1024) (i32.const 8192)))
  (call $nul_to_newline (i32.const 8192) (i32.load (i32.const 20)))
  (call $print (i32.const 8192) (i32.load (i32.const 20)))
  (drop (call $env_sizes (i32.const 16) (i32.const 20)))
  (drop (call $env_get (i32.const 1024) (i32.const 8192)))
  (call $nul_to_newline (i32.const 8192) (i32.load (i32.const 20)))
  (call $print (i32.const 8192) (i32.load (i32.const 20)))))"""


def cat_file(path: str) -> str:
    """Prints the file at ``path`` (relative to the preopened root, fd 3); exits with the WASI errno if it cannot."""
    return f"""(module
 (import "wasi_snapshot_preview1" "path_open"
  (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
 {_IMPORTS}
 (data (i32.const 64) "{_wat_string(path)}")
 (func (export "_start") (local $err i32)
  (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const {len(path.encode())})
   (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 32)))
  (if (local.get $err) (then (call $exit (local.get $err))))
  (i32.store (i32.const 40) (i32.const 4096)) (i32.store (i32.const 44) (i32.const 4096))
  (local.set $err (call $fd_read (i32.load (i32.const 32)) (i32.const 40) (i32.const 1) (i32.const 48)))
  (if (local.get $err) (then (call $exit (local.get $err))))
  (call $print (i32.const 4096) (i32.load (i32.const 48)))))"""


def echo_stdin() -> str:
    """Copies one read of stdin (up to 4 KiB) to stdout."""
    return f"""(module
 (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
 {_IMPORTS}
 (func (export "_start")
  (i32.store (i32.const 40) (i32.const 4096)) (i32.store (i32.const 44) (i32.const 4096))
  (if (call $fd_read (i32.const 0) (i32.const 40) (i32.const 1) (i32.const 48)) (then (call $exit (i32.const 9))))
  (call $print (i32.const 4096) (i32.load (i32.const 48)))))"""


def create_file(path: str) -> str:
    """Creates ``path`` under the preopened root; exits with the WASI errno if it cannot, 0 if it can."""
    return f"""(module
 (import "wasi_snapshot_preview1" "path_open"
  (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 {_IMPORTS}
 (data (i32.const 64) "{_wat_string(path)}")
 (func (export "_start") (local $err i32)
  (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const {len(path.encode())})
   (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 32)))
  (if (local.get $err) (then (call $exit (local.get $err))))))"""


def spin() -> str:
    return f"""(module {_IMPORTS}
 (func (export "_start") (loop $forever (br $forever))))"""


def grow_memory(pages: int) -> str:
    """Grows memory by ``pages``: prints "grown" and exits 0, or prints "grow failed" and exits 3."""
    return f"""(module {_IMPORTS}
 (data (i32.const 64) "grown\\0agrow failed\\0a")
 (func (export "_start")
  (if (i32.eq (memory.grow (i32.const {pages})) (i32.const -1))
   (then (call $print (i32.const 70) (i32.const 12)) (call $exit (i32.const 3))))
  (call $print (i32.const 64) (i32.const 6))))"""


def trap() -> str:
    return f"""(module {_IMPORTS}
 (func (export "_start") unreachable))"""


def many_functions(count: int) -> str:
    """A module that takes measurably long to compile (for the cache tests)."""
    body = "".join(
        f"(func $f{i} (param i32) (result i32) (i32.mul (i32.add (local.get 0) (i32.const {i})) (i32.const 3)))"
        for i in range(count)
    )
    return f"""(module {_IMPORTS} {body}
 (func (export "_start") (drop (call $f0 (i32.const 1)))))"""


def install(rootfs: Path, guest_path: str, wat: str, key: Path | None,
            config: dict[str, int | None] | None = None) -> Path:
    """Write the module at ``guest_path`` inside ``rootfs``; sign it with ``key`` unless key is None."""
    path = rootfs / guest_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wasmtime.wat2wasm(wat))
    if key is not None:
        signing.sign_module(str(path), str(key), config)
    return path


def make_key(directory: Path, name: str = "signer.pem") -> Path:
    key = directory / name
    if not key.exists():
        signing.generate_key(str(key))
    return key


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
