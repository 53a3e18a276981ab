"""Precompiled-module cache: compiled WebAssembly kept as native code so warm starts skip the compiler.

An entry is ``<dir>/<key>.cwasm`` (the serialized module exactly, so wasmtime can map it) and ``<key>.mac``
where key = SHA-256(module digest, wasmtime version, engine settings): an engine configured differently never
sees it. A serialized module is trusted native code, so:

- the directory is root-only (created 0700; refused when group/other can write it or another user owns it);
- the ``.mac`` holds HMAC-SHA256 over the key and the entry under a host key (``<dir>/hmac.key``, 0600,
  created once), then the entry file's identity (inode, size, mtime and ctime in ns) and an HMAC binding the
  two. ``open_verified`` checks an open file and hands wasmtime that same file (``/proc/self/fd/N``): what was
  checked is what gets loaded. When the file's identity is the one recorded, its bytes are the ones MACed (any
  write changes mtime and ctime, which user space cannot set back): a warm start reads 100 bytes, not the
  27 MB of a compiled python.wasm. Otherwise (copied, restored) the bytes are MACed again and the record is
  renewed; an entry that fails (truncated, corrupt, planted, or its two files from different writers) is
  ignored and rebuilt;
- writes go to temporary files in the same directory, fsync'd, then renamed into place, under an exclusive
  ``flock`` of ``<key>.lock`` that readers share: concurrent cold starts compile once (``build_once``) and the
  others wait for that entry; a crash mid-write leaves temporary files, which later writers remove once
  stale, or a mismatched pair, which fails the check.

Default directory /var/lib/clave/wasm-cache; ``CLAVE_WASM_CACHE`` overrides it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import mmap
import os
import stat
import struct
import time

DEFAULT_DIR = "/var/lib/clave/wasm-cache"
ENV_DIR = "CLAVE_WASM_CACHE"
MAC_DOMAIN = b"clave-wasm-cache/1\0"
MAC_SIZE = 32
KEY_FILE = "hmac.key"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600
# The identity of an entry file: inode, size, mtime_ns, ctime_ns.
FILE_ID = struct.Struct("<QQqq")
STAT_MAC_DOMAIN = b"clave-wasm-cache-stat/1\0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


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
            tmp = os.path.join(self.directory, f"{TMP_PREFIX}key-{os.getpid()}-{os.urandom(4).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # first writer wins; the others read its key
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        raise CacheError(f"cannot create the wasm cache key {path}")

    def _mac(self, key: str, payload: bytes | memoryview | mmap.mmap) -> bytes:
        assert self._mac_key is not None, "ModuleCache.open() first"
        mac = hmac.new(self._mac_key, MAC_DOMAIN + key.encode() + b"\0", hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.cwasm")

    def mac_path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.mac")

    def lock_path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.lock")

    def _locked(self, key: str, exclusive: bool) -> int:
        fd = os.open(self.lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        return fd

    def _stat_record(self, key: str, content_mac: bytes, st: os.stat_result) -> bytes:
        assert self._mac_key is not None, "ModuleCache.open() first"
        identity = FILE_ID.pack(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        binding = hmac.new(self._mac_key, STAT_MAC_DOMAIN + key.encode() + b"\0" + content_mac + identity,
                           hashlib.sha256).digest()
        return identity + binding

    def open_verified(self, key: str) -> int | None:
        """An open fd of the entry if present and intact (the caller closes it); a damaged entry is removed."""
        lock = self._locked(key, exclusive=False)
        try:
            return self._open_verified(key)
        finally:
            os.close(lock)

    def _open_verified(self, key: str, remove_damaged: bool = True) -> int | None:
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            with open(self.mac_path(key), "rb") as f:
                record = f.read()
            content_mac, stat_record = record[:MAC_SIZE], record[MAC_SIZE:]
            st = os.fstat(fd)
            if len(content_mac) == MAC_SIZE and st.st_size:
                if stat_record and hmac.compare_digest(stat_record, self._stat_record(key, content_mac, st)):
                    return fd  # the very file whose bytes were MACed, unchanged since
                with mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ) as mapped:
                    if hmac.compare_digest(content_mac, self._mac(key, mapped)):
                        self._renew_record(key, content_mac, st)
                        return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        if remove_damaged:
            self._remove(key)
        return None

    def _renew_record(self, key: str, content_mac: bytes, st: os.stat_result) -> None:
        try:
            self._write(self.mac_path(key), key, content_mac + self._stat_record(key, content_mac, st))
        except OSError:  # read-only or full: the next start checks the bytes again
            pass

    def get(self, key: str) -> bytes | None:
        """The entry's bytes if present and intact."""
        fd = self.open_verified(key)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _remove(self, key: str) -> None:
        for path in (self.path(key), self.mac_path(key)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def put(self, key: str, serialized: bytes) -> None:
        lock = self._locked(key, exclusive=True)
        try:
            self._put(key, serialized)
        finally:
            os.close(lock)

    def _put(self, key: str, serialized: bytes) -> None:
        self._remove_stale_temporaries()
        content_mac = self._mac(key, serialized)
        st = self._write(self.path(key), key, serialized)
        self._write(self.mac_path(key), key, content_mac + self._stat_record(key, content_mac, st))

    def file_digest(self, path: str) -> bytes:
        """SHA-256 of a host file (a language runtime module), remembered under the file's identity: hashing
        python.wasm (26 MB) costs ~20 ms that a warm start should not pay."""
        name = hashlib.sha256(b"digest\0" + os.path.abspath(path).encode()).hexdigest()
        memo = os.path.join(self.directory, f"{name}.digest")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                with open(memo, "rb") as m:
                    record = m.read()
                digest, stat_record = record[:32], record[32:]
                if len(digest) == 32 and hmac.compare_digest(stat_record, self._stat_record(name, digest, st)):
                    return digest
            except FileNotFoundError:
                pass
            digest = hashlib.file_digest(f, "sha256").digest()
            if os.fstat(f.fileno()) == st:  # not written to while it was hashed
                try:
                    self._write(memo, name, digest + self._stat_record(name, digest, st))
                except OSError:
                    pass
        return digest

    def build_once(self, key: str, build: Callable[[], bytes]) -> bool:
        """Make sure the entry exists, building it at most once across concurrent callers: the first takes the
        key's lock and builds, the others wait for it and find the entry. Returns whether this call built it."""
        lock = self._locked(key, exclusive=True)
        try:
            fd = self._open_verified(key)
            if fd is not None:
                os.close(fd)
                return False
            self._put(key, build())
            return True
        finally:
            os.close(lock)

    def _write(self, path: str, key: str, data: bytes) -> os.stat_result:
        """Write ``path`` atomically; returns the identity of the file now there (after the rename, which
        changes its ctime)."""
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.rename(tmp, path)
                return os.fstat(f.fileno())
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
