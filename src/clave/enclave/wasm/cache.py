"""Precompiled-module cache: compiled WebAssembly kept as native code so warm starts skip the compiler.

An entry is ``<dir>/<key>.cwasm`` where key = SHA-256(module digest, wasmtime version, engine settings): an
engine configured differently never sees it. A serialized module is trusted native code, so:

- the directory is root-only (created 0700; refused when group/other can write it or another user owns it);
- each entry carries an HMAC-SHA256 over its key and contents under a host key (``<dir>/hmac.key``, 0600,
  created once); an entry that fails the check (truncated, corrupt, planted) is ignored and rebuilt;
- writes go to a temporary file in the same directory, fsync'd, then renamed into place: concurrent cold
  starts each write a complete entry and the last rename wins; a crash mid-write leaves only a temporary
  file, which later writers remove once it is stale.

Default directory /var/lib/clave/wasm-cache; ``CLAVE_WASM_CACHE`` overrides it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import time

DEFAULT_DIR = "/var/lib/clave/wasm-cache"
ENV_DIR = "CLAVE_WASM_CACHE"
MAGIC = b"CLVCWSM\x01"
MAC_SIZE = 32
KEY_FILE = "hmac.key"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600


class CacheError(Exception):
    """The cache directory cannot be trusted or used; one line."""


def cache_dir() -> str:
    return os.environ.get(ENV_DIR) or DEFAULT_DIR


def entry_key(module_sha256: bytes, wasmtime_version: str, engine_settings: str) -> str:
    material = b"\0".join([module_sha256, wasmtime_version.encode(), engine_settings.encode()])
    return hashlib.sha256(material).hexdigest()


class ModuleCache:
    """One cache directory. ``get`` returns verified serialized bytes or None; ``put`` stores them."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or cache_dir()
        self._mac_key: bytes | None = None

    def open(self) -> None:
        """Create or check the directory and load the host MAC key."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        st = os.stat(self.directory)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IRWXO):
            raise CacheError(f"wasm cache {self.directory} must be owned by uid {os.geteuid()} and not "
                             f"accessible to others (mode {stat.S_IMODE(st.st_mode):o}): chmod 700 it")
        self._mac_key = self._load_or_create_key()

    def _load_or_create_key(self) -> bytes:
        path = os.path.join(self.directory, KEY_FILE)
        for _ in range(3):
            try:
                with open(path, "rb") as f:
                    key = f.read()
                if len(key) == 32:
                    return key
                raise CacheError(f"wasm cache key {path} is corrupt ({len(key)} bytes): remove it")
            except FileNotFoundError:
                pass
            tmp = os.path.join(self.directory, f"{TMP_PREFIX}key-{os.getpid()}-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # first writer wins; the others read its key
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        raise CacheError(f"cannot create the wasm cache key {path}")

    def _mac(self, key: str, payload: bytes | memoryview) -> bytes:
        assert self._mac_key is not None, "ModuleCache.open() first"
        mac = hmac.new(self._mac_key, MAGIC + key.encode(), hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.cwasm")

    def get(self, key: str) -> bytes | None:
        """The serialized module if present and intact; a damaged entry is removed and None returned."""
        try:
            with open(self.path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        header = len(MAGIC) + MAC_SIZE
        view = memoryview(data)
        if (len(data) > header and data.startswith(MAGIC)
                and hmac.compare_digest(bytes(view[len(MAGIC):header]), self._mac(key, view[header:]))):
            return data[header:]
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        return None

    def put(self, key: str, serialized: bytes) -> None:
        self._remove_stale_temporaries()
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(self._mac(key, serialized))
                f.write(serialized)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path(key))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for name in os.listdir(self.directory):
            if not name.startswith(TMP_PREFIX):
                continue
            path = os.path.join(self.directory, name)
            try:
                if now - os.stat(path).st_mtime > STALE_TMP_SECONDS:
                    os.unlink(path)
            except FileNotFoundError:
                pass
