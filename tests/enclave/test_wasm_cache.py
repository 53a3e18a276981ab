"""The precompiled-module cache: warm starts deserialize, concurrent cold starts leave one valid entry, and a
damaged or planted entry is detected and rebuilt instead of being loaded as native code."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("wasmtime")

import _wasm_modules as wat  # noqa: E402

from clave.enclave.runtime import EnclaveError  # noqa: E402
from clave.enclave.wasm import cache  # noqa: E402
from clave.enclave.wasm.runtime import WasmRuntime  # noqa: E402

MODULE = "/app/main.wasm"
START_AND_RUN = """
import os, sys, time
from clave.enclave.wasm.runtime import WasmRuntime
root, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # all children start compiling together
runtime = WasmRuntime(cache_dir=root + "/cache", platform_key_path=root + "/platform.pem")
runtime.prepare(root + "/rootfs", {"process": {"args": ["/app/main.wasm"]}})
runtime.init("", "info")
sys.exit(runtime.exec(runtime.create_process("/app/main.wasm", ["main"], [], (0, 1, 2))))
"""


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLAVE_WASM_SIGNERS", str(tmp_path / "no-signer-policy"))
    wat.install(tmp_path / "rootfs", MODULE, wat.many_functions(1500), wat.make_key(tmp_path))
    return tmp_path


def start(root: Path) -> WasmRuntime:
    runtime = WasmRuntime(cache_dir=str(root / "cache"), platform_key_path=str(root / "platform.pem"))
    runtime.prepare(str(root / "rootfs"), {"process": {"args": [MODULE]}})
    runtime.init("", "info")
    assert runtime.exec(runtime.create_process(MODULE, ["main"], [], (0, 1, 2))) == 0
    return runtime


def entries(root: Path) -> list[Path]:
    return sorted((root / "cache").glob("*.cwasm"))


def test_cold_then_warm_start(root: Path) -> None:
    assert start(root).cache_hit is False
    assert len(entries(root)) == 1
    assert (root / "cache").stat().st_mode & 0o777 == 0o700
    assert (root / "cache" / cache.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert start(root).cache_hit is True


def test_concurrent_cold_starts_all_succeed_and_leave_one_valid_entry(root: Path) -> None:
    start_at = time.time() + 1.0
    children = [subprocess.Popen([sys.executable, "-c", START_AND_RUN, str(root), str(start_at)],
                                 stderr=subprocess.PIPE) for _ in range(4)]
    results = [(child.wait(60), child.stderr.read() if child.stderr else b"") for child in children]
    assert results == [(0, b"")] * 4
    [entry] = entries(root)
    assert not [p for p in (root / "cache").iterdir() if p.name.startswith(cache.TMP_PREFIX)]
    store = cache.ModuleCache(str(root / "cache"))
    store.open()
    assert store.get(entry.stem) is not None
    assert start(root).cache_hit is True


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "planted", "no-mac", "swapped-mac"])
def test_damaged_entry_is_detected_and_rebuilt(root: Path, damage: str) -> None:
    start(root)
    [entry] = entries(root)
    mac = entry.with_suffix(".mac")
    data = entry.read_bytes()
    if damage == "truncate":  # a crash mid-write without the rename protocol
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        entry.write_bytes(data[:-100] + bytes([data[-100] ^ 0x80]) + data[-99:])
    elif damage == "empty":
        entry.write_bytes(b"")
    elif damage == "planted":  # native code written by someone without the host key, with a made-up MAC
        entry.write_bytes(data.replace(b"\x90", b"\xcc"))
        mac.write_bytes(bytes(cache.MAC_SIZE))
    elif damage == "no-mac":
        mac.unlink()
    else:  # a genuine MAC, of another entry name: an entry cannot be moved to another key
        store = cache.ModuleCache(str(root / "cache"))
        store.open()
        mac.write_bytes(store._mac("0" * 64, data))
    assert start(root).cache_hit is False
    assert start(root).cache_hit is True


def test_crash_leftovers_are_cleaned_and_ignored(root: Path) -> None:
    start(root)
    leftover = root / "cache" / f"{cache.TMP_PREFIX}deadbeef-1-0"
    leftover.write_bytes(b"half written")
    old = time.time() - 2 * cache.STALE_TMP_SECONDS
    os.utime(leftover, (old, old))
    store = cache.ModuleCache(str(root / "cache"))
    store.open()
    store.put("0" * 64, b"payload")
    assert not leftover.exists()
    assert store.get("0" * 64) == b"payload"
    assert sorted(p.name for p in (root / "cache").iterdir() if p.name.startswith("0")) == [
        "0" * 64 + ".cwasm", "0" * 64 + ".lock", "0" * 64 + ".mac"]


def test_cache_directory_open_to_others_is_refused(root: Path) -> None:
    (root / "cache").mkdir(mode=0o755)
    os.chmod(root / "cache", 0o755)
    with pytest.raises(EnclaveError, match=r"must be owned by uid \d+ and not accessible to others"):
        start(root)
    os.chmod(root / "cache", 0o700)
    start(root)


def test_a_warm_check_reads_the_record_not_the_entry(root: Path) -> None:
    start(root)
    [entry] = entries(root)
    store = cache.ModuleCache(str(root / "cache"))
    store.open()
    calls: list[int] = []
    real_mac = store._mac
    store._mac = lambda key, payload: calls.append(1) or real_mac(key, payload)  # type: ignore[method-assign]
    fd = store.open_verified(entry.stem)
    assert fd is not None and calls == []
    os.close(fd)
    os.utime(entry)  # a changed identity (a restored copy, say): the bytes are checked and the record renewed
    fd = store.open_verified(entry.stem)
    assert fd is not None and calls == [1]
    os.close(fd)
    fd = store.open_verified(entry.stem)
    assert fd is not None and calls == [1]
    os.close(fd)


def test_file_digests_are_remembered_until_the_file_changes(tmp_path: Path) -> None:
    store = cache.ModuleCache(str(tmp_path / "cache"))
    store.open()
    module = tmp_path / "runtime.wasm"
    module.write_bytes(b"\0asm" + bytes(1000))
    first = store.file_digest(str(module))
    assert first == hashlib.sha256(module.read_bytes()).digest()
    assert store.file_digest(str(module)) == first
    module.write_bytes(b"\0asm" + bytes(999) + b"\1")
    assert store.file_digest(str(module)) == hashlib.sha256(module.read_bytes()).digest() != first


def test_entry_key_depends_on_module_version_and_engine_settings() -> None:
    digest = b"\1" * 32
    keys = {cache.entry_key(digest, "50.0.1", "a"), cache.entry_key(b"\2" * 32, "50.0.1", "a"),
            cache.entry_key(digest, "51.0.0", "a"), cache.entry_key(digest, "50.0.1", "b")}
    assert len(keys) == 4
