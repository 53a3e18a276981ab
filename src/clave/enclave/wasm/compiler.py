"""The one wasmtime engine configuration of the WebAssembly enclave, and ahead-of-time compilation into the cache.

A language runtime is large (python.wasm: 26 MB, about 10 s to compile on two cores, 300 MB of memory), so it
is compiled before the container exists, by ``ensure_compiled`` in the runtime process (``clave create``, the
shim), in a separate compiler process that may use every core and the host's memory, not the container's
cgroup. The container's init then only deserializes it. Concurrent cold starts compile once (the cache's
per-entry lock) and the others wait for that entry.
"""

from __future__ import annotations

import os
import sys
import time

from clave.enclave.wasm import cache as module_cache
from clave.enclave.wasm import capi

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# Part of the cache key: an engine configured differently must not load these compiled modules. (How many
# threads compile is not a code-generation setting: the compiler process's output loads in the init.)
ENGINE_SETTINGS = "epoch_interruption=1;opt_level=speed;parallel_compilation=0;v1"


def new_engine(parallel: bool = False) -> capi.Engine:
    # The init must stay single-threaded until it runs the process (the PAL contract): no compiler pool there.
    return capi.Engine(epoch_interruption=True, opt_level="speed", parallel_compilation=parallel)


def wasmtime_version(package_dir: str | None = None) -> str:
    """The installed wasmtime's version and native library size, without importing it or importlib.metadata
    (~40 ms): from the dist-info directory beside the package."""
    if package_dir is None:
        package_dir = capi.package_dir() or ""
    versions = capi.installed_versions(package_dir) if package_dir else []
    library = capi.library_path(package_dir) if package_dir else ""
    size = os.stat(library).st_size if os.path.exists(library) else 0
    return f"{','.join(versions) or 'unknown'}:{size}"


def cache_key(module_sha256: bytes, version: str | None = None) -> str:
    return module_cache.entry_key(module_sha256, version or wasmtime_version(), ENGINE_SETTINGS)


def ensure_compiled(module_path: str, cache_dir: str | None = None,
                    announce: Callable[[str], None] | None = None) -> bool:
    """Compile a host module into the cache unless it is there; returns whether it was compiled now."""
    store = module_cache.ModuleCache(cache_dir)
    store.open()
    key = cache_key(store.file_digest(module_path))
    fd = store.open_verified(key)
    if fd is not None:
        os.close(fd)
        return False
    if announce is not None:
        size = os.stat(module_path).st_size >> 20
        announce(f"compiling {os.path.basename(module_path)} ({size} MiB) for this host, once: "
                 "this takes a while (about 10 s for python.wasm on two cores)")
    import subprocess  # only on a cache miss: not on every start

    started = time.monotonic()
    argv = [sys.executable, "-I", "-S", "-c", _CHILD, os.pathsep.join(sys.path), module_path, store.directory]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().split("\n") if line.strip()]
        raise module_cache.CacheError(f"compiling {module_path} failed: {lines[-1] if lines else result.returncode}")
    if announce is not None:
        announce(f"compiled {os.path.basename(module_path)} in {time.monotonic() - started:.1f} s")
    return True


_CHILD = ("import os, sys; sys.path[:0] = sys.argv[1].split(os.pathsep); "
          "from clave.enclave.wasm import compiler; compiler._compile()")


def _compile() -> None:
    """The compiler process: compile with every core into the cache (once, under the entry's lock)."""
    module_path, directory = sys.argv[2], sys.argv[3]
    store = module_cache.ModuleCache(directory)
    store.open()
    with open(module_path, "rb") as f:
        wasm = f.read()
    import hashlib

    key = cache_key(hashlib.sha256(wasm).digest(), wasmtime_version())

    def build() -> bytes:
        return capi.Module(new_engine(parallel=True), wasm).serialize()

    store.build_once(key, build)
