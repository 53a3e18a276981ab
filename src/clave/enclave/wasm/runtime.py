"""``WasmRuntime``: the built-in WebAssembly enclave runtime, a PAL (API v3) implemented on wasmtime (``capi``).

It runs the WASI (preview 1) command module named by the process path, or, when the path names an interpreter
(``python3``, ``node``...: see ``interpreters``), that language's WebAssembly runtime with the same arguments;
args, env and stdio are passed through and the container rootfs is preopened as "/" (read-only when
``root.readonly``, and always for an app run by a language runtime, whose image is measured; writable OCI mounts
inside it stay writable). Before anything runs (``prepare``, in the init
before pivot_root) the signature is checked: a module's ``MODULE.wasm.sig``, or an app's ``/.clave/enclave.sig``
over its measured manifest (runtime, files, args). An unsigned, tampered or badly signed one is refused, and so
is a signer outside ``/etc/clave/wasm-signers`` when that file exists (one mrsigner in hex per line;
``CLAVE_WASM_SIGNERS`` overrides the path).

Limits (see ``measure``): the guest's linear memory is capped at the tighter of the signed ``memory_limit`` and
``linux.resources.memory.limit`` (``memory.grow`` then returns -1, as for any failed allocation); its CPU time
at the tighter of the signed ``cpu_time_limit`` and ``RLIMIT_CPU`` (a watchdog reads the guest thread's CPU
clock and interrupts it: exit 128+SIGXCPU, as the kernel's limit would). The CPU rate (``cpu.quota/period``)
needs no mapping: the container's cgroup throttles the thread that runs the guest.

Signals: WASI preview 1 has none, so a signal that would terminate a process terminates the guest (through an
epoch interruption, exit 128+signal) and the others (SIGCHLD, SIGWINCH, SIGCONT, stop signals...) are ignored.
A guest blocked in a host call (reading stdin) only stops when that call returns. Every process has its own
engine, so ``kill(pid)`` interrupts only that process. A trap ends the process with 128+SIGABRT and the trap
message on its stderr; ``proc_exit(n)`` gives exit status n (wasmtime accepts n < 126 only; above is a trap).

Compiled modules come from ``cache.ModuleCache`` (warm start: deserialize, about 1 ms). A language runtime is
compiled before the container's init exists (``ensure_compiled``, in a compiler process with all cores: about
10 s for python.wasm), so the init only ever deserializes it.
"""

from __future__ import annotations

import _signal as signal  # the constants without signal's enum import (~3 ms per start)
import hashlib
import os
import posixpath
import threading
import time

from clave.attestation import wasm_report as report
from clave.enclave.runtime import EnclaveError, EnclaveRuntime
from clave.enclave.wasm import cache as module_cache
from clave.enclave.wasm import capi, compiler, interpreters, measure, signing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SIGNERS_FILE = "/etc/clave/wasm-signers"
ENV_SIGNERS = "CLAVE_WASM_SIGNERS"
# Signals whose default action is not to terminate: WASI preview 1 has no handlers, so these are ignored.
NON_TERMINATING_SIGNALS = frozenset({
    signal.SIGCHLD, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGURG, signal.SIGWINCH,
})
WATCHDOG_INTERVAL = 0.01
MAX_SYMLINKS = 40
WASM_MAGIC = b"\0asm"


class _Loaded:
    """A verified, compiled module; its first process may use the engine it was compiled for. ``signed`` is
    None for a language runtime (the app's signature covers it)."""

    def __init__(self, guest_path: str, signed: signing.SignedModule | None, engine: capi.Engine,
                 module: capi.Module) -> None:
        self.guest_path = guest_path
        self.signed = signed
        self.serialized: bytes | None = None  # made when a second process needs its own engine
        self.engine = engine
        self.module = module
        self.engine_taken = False
        self.digest: bytes | None = None  # SHA-256 of the module


class _Process:
    """One enclave process: its own engine (so an epoch interruption stops only it), store and state."""

    def __init__(self, pid: int, loaded: _Loaded, engine: capi.Engine, module: capi.Module, store: capi.Store,
                 stdio: tuple[int, int, int], cpu_time_limit: int | None) -> None:
        self.pid = pid
        self.loaded = loaded
        self.engine = engine
        self.module = module
        self.store = store  # keeps the stdout/stderr callbacks it calls alive
        self.stdio = stdio
        self.cpu_time_limit = cpu_time_limit
        self.kill_signal: int | None = None
        self.cpu_exceeded = False
        self.started = False


def resolve_in_root(root: str, path: str, cwd: str = "/") -> str:
    """The host path of ``path`` inside ``root``, following symlinks as if ``root`` were "/"."""
    pending = [p for p in posixpath.join(cwd, path).split("/") if p]
    resolved: list[str] = []
    hops = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, name)
        if os.path.islink(candidate):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise EnclaveError(f"wasm: too many symbolic links resolving {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        resolved.append(name)
    return os.path.join(root, *resolved)


def preload() -> None:
    """Load what ``prepare`` loads (wasmtime's library, cryptography's Ed25519): called by the enclave handler
    in the runtime process before it forks the init. Under `clave run` that only moves the cost; a long-lived
    caller (the shim) pays it once and every init it forks inherits them."""
    try:
        capi.load()
    except capi.WasmtimeError:
        pass  # prepare reports it, in the init
    from cryptography.exceptions import InvalidSignature  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey  # noqa: F401


def writable_mounts(config: dict[str, Any]) -> list[str]:
    """The destinations of the OCI mounts a guest may write below a read-only root: writable bind and tmpfs
    mounts, not the kernel's file systems."""
    out = []
    for mount in config.get("mounts", []) or []:
        destination = posixpath.normpath("/" + mount.get("destination", ""))
        options = mount.get("options") or []
        kind = mount.get("type") or ("bind" if "bind" in options or "rbind" in options else "")
        if kind not in ("bind", "tmpfs") or "ro" in options or destination == "/":
            continue
        if destination.split("/")[1] in ("proc", "sys", "dev"):
            continue
        out.append(destination)
    return out


def allowed_signers_from_policy() -> frozenset[str] | None:
    """The allowed mrsigners from the host policy file, or None (any signer) when it does not exist."""
    path = os.environ.get(ENV_SIGNERS) or SIGNERS_FILE
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    return frozenset(line.split("#")[0].strip().lower() for line in lines if line.split("#")[0].strip())


class WasmRuntime(EnclaveRuntime):
    name = "wasm"
    api_version = 3
    insecure = True  # software isolation only: no hardware memory encryption

    def __init__(self, cache_dir: str | None = None, platform_key_path: str | None = None,
                 allowed_signers: frozenset[str] | None = None) -> None:
        self._cache_dir = cache_dir
        self._platform_key_path = platform_key_path
        self._allowed_signers = allowed_signers
        self._prepared = False
        self._wasmtime_version = ""
        self._cache: module_cache.ModuleCache | None = None
        self._platform_key: Any = None
        self._rootfs = "/"
        self._root_id: tuple[int, int] = (0, 0)
        self._root_dir = "/"
        self._cwd = "/"
        self._readonly = False
        self._writable_mounts: list[str] = []
        self._oci_limits: dict[str, int | None] = measure.enclave_config(None)
        self._modules: dict[str, _Loaded] = {}
        self._main: _Loaded | None = None
        self._identity: signing.SignedModule | None = None  # what measurement() and local reports state
        self._host_dirs: dict[str, int] = {}  # host directories preopened for the guest, opened before pivot
        self._processes: dict[int, _Process] = {}
        self._next_pid = 1
        self._lock = threading.Lock()
        self.cache_hit: bool | None = None  # whether the last module loaded came from the cache

    # -- pal_init and loading -------------------------------------------------------------------------------

    def prepare(self, rootfs: str, config: dict[str, Any]) -> None:
        # Loaded here, in the init before pivot_root (the package files are out of reach afterwards).
        try:
            capi.load()
        except capi.WasmtimeError as exc:
            raise EnclaveError(f"wasm: {exc}") from None
        self._prepared = True
        self._wasmtime_version = compiler.wasmtime_version()
        self._rootfs = os.path.abspath(rootfs)
        st = os.stat(self._rootfs)
        self._root_id = (st.st_dev, st.st_ino)
        self._root_dir = self._rootfs
        process = config.get("process", {})
        self._cwd = process.get("cwd") or "/"
        self._readonly = bool(config.get("root", {}).get("readonly", False))
        self._writable_mounts = writable_mounts(config)
        self._oci_limits = measure.enclave_config(config)
        if self._allowed_signers is None:
            self._allowed_signers = allowed_signers_from_policy()
        try:
            self._platform_key = report.load_platform_key(self._platform_key_path)
        except (OSError, ValueError, report.ReportError) as exc:
            raise EnclaveError(f"wasm: platform key: {exc}") from None
        cache = module_cache.ModuleCache(self._cache_dir)
        try:
            cache.open()
        except module_cache.CacheError as exc:
            raise EnclaveError(f"wasm: {exc}") from None
        except OSError as exc:
            raise EnclaveError(f"wasm: cannot open the module cache {cache.directory}: {exc}") from None
        self._cache = cache
        args = process.get("args") or []
        if not args:
            raise EnclaveError("wasm: process.args is empty: args[0] must name the WASI module")
        language = self._language(args[0])
        if language is None:
            self._main = self._load(args[0])
            self._identity = self._main.signed
            return
        self._main = self._load_language(language)
        self._identity = self._verify_app(language, self._main, config)
        self._readonly = True  # the measured image stays as measured: apps write to OCI mounts only
        for host in language.guest_env([], self._cwd)[1].values():
            self._host_dir(host)

    def _verify_app(self, language: interpreters.LanguageRuntime, loaded: _Loaded, config: dict[str, Any]
                    ) -> signing.SignedModule:
        process = config.get("process", {})
        try:
            with open(signing.app_signature_path(self._rootfs), "rb") as f:
                document: bytes | None = f.read()
        except FileNotFoundError:
            document = None
        except OSError as exc:
            raise EnclaveError(f"wasm: cannot read /{signing.APP_SIGNATURE}: {exc.strerror}") from None
        assert loaded.digest is not None
        try:
            manifest = measure.bundle_manifest(language.name, language.code_env(process.get("env") or []),
                                               loaded.digest, self._rootfs, config,
                                               signing.signed_config(document) or self._oci_limits)
        except OSError as exc:
            raise EnclaveError(f"wasm: cannot measure the image: {exc.strerror}: {exc.filename}") from None
        try:
            identity = signing.verify_app(manifest, document, f"the {language.name} app")
        except signing.SignatureError as exc:
            raise EnclaveError(f"wasm: refused: {exc}") from None
        self._check_signer(identity, f"the {language.name} app")
        return identity

    def _check_signer(self, signed: signing.SignedModule, what: str) -> None:
        if self._allowed_signers is not None and signed.mrsigner.hex() not in self._allowed_signers:
            raise EnclaveError(f"wasm: refused: {what} is signed by {signed.mrsigner.hex()}, "
                               "which is not an allowed signer")

    def _language(self, path: str) -> interpreters.LanguageRuntime | None:
        """The language runtime ``path`` names, unless it is a WebAssembly module in the image."""
        language = interpreters.for_command(path)
        if language is None or "/" not in path:
            return language
        try:
            with open(resolve_in_root(self._root_dir, self._guest_path(path)), "rb") as f:
                return None if f.read(4) == WASM_MAGIC else language
        except OSError:
            return language

    def _host_dir(self, path: str) -> str:
        """A host directory the guest sees, reachable after pivot_root through a descriptor opened before it."""
        if path not in self._host_dirs:
            self._host_dirs[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._host_dirs[path]}"

    def _load_language(self, language: interpreters.LanguageRuntime) -> _Loaded:
        name = f"<{language.name} runtime>"
        if name in self._modules:
            return self._modules[name]
        if self._cache is None and self._root_dir == "/":
            raise EnclaveError(f"wasm: the {language.name} runtime is not loaded in this enclave (its main process "
                               "runs another language)")
        try:
            path = language.module_path()
            digest = self._cache.file_digest(path) if self._cache is not None else _file_sha256(path)
            with open(path, "rb") as module_file:
                loaded = self._compile(name, module_file, digest, None)
        except OSError as exc:
            raise EnclaveError(f"wasm: {exc.strerror or exc}") from None
        self._modules[name] = loaded
        return loaded

    def _guest_path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self._cwd, path))

    def _load(self, path: str) -> _Loaded:
        guest_path = self._guest_path(path)
        if guest_path in self._modules:
            return self._modules[guest_path]
        host_path = resolve_in_root(self._root_dir, guest_path)
        try:
            module_file = open(host_path, "rb")  # kept open until compiled: closed below
        except OSError as exc:
            raise EnclaveError(f"wasm: cannot read the module {guest_path}: {exc.strerror} (an entrypoint is a "
                               f"WASI module or one of the interpreters {interpreters.SUPPORTED})") from None
        with module_file:
            if module_file.read(4) != WASM_MAGIC:
                raise EnclaveError(f"wasm: {guest_path} is neither a WebAssembly module nor a supported interpreter "
                                   f"({interpreters.SUPPORTED})")
            module_file.seek(0)
            try:
                with open(host_path + signing.SIG_SUFFIX, "rb") as f:
                    sig: bytes | None = f.read()
            except FileNotFoundError:
                sig = None
            except OSError as exc:
                raise EnclaveError(f"wasm: cannot read the signature of {guest_path}: {exc.strerror}") from None
            try:
                digest = hashlib.file_digest(module_file, "sha256").digest()
                signed = signing.verify_digest(digest, sig, guest_path)
            except signing.SignatureError as exc:
                raise EnclaveError(f"wasm: refused: {exc}") from None
            self._check_signer(signed, guest_path)
            loaded = self._compile(guest_path, module_file, signed.module_sha256, signed)
        self._modules[guest_path] = loaded
        return loaded

    def _new_engine(self) -> capi.Engine:
        return compiler.new_engine()

    def _compile(self, guest_path: str, module_file: Any, digest: bytes, signed: signing.SignedModule | None
                 ) -> _Loaded:
        engine = self._new_engine()
        key = compiler.cache_key(digest, self._wasmtime_version)
        module = self._from_cache(engine, key)
        self.cache_hit = module is not None
        if module is None:
            module_file.seek(0)
            wasm = module_file.read()
            if measure.module_digest(wasm) != digest:  # changed since it was hashed
                raise EnclaveError(f"wasm: refused: {guest_path} changed while it was being loaded")
            try:
                module = capi.Module(engine, wasm)
            except capi.WasmtimeError as exc:
                raise EnclaveError(f"wasm: {guest_path} is not a valid WebAssembly module: {exc.cause}") from None
            if self._cache is not None:
                try:
                    self._cache.put(key, module.serialize())
                except OSError:  # a full or unreachable cache costs speed, not correctness
                    pass
        loaded = _Loaded(guest_path, signed, engine, module)
        loaded.digest = digest
        return loaded

    def _from_cache(self, engine: capi.Engine, key: str) -> capi.Module | None:
        """The compiled module from a verified cache entry, mapped by wasmtime from the very file checked."""
        if self._cache is None:
            return None
        try:
            fd = self._cache.open_verified(key)
        except OSError:
            return None
        if fd is None:
            return None
        try:
            if os.path.exists(f"/proc/self/fd/{fd}"):
                return capi.Module.deserialize_file(engine, f"/proc/self/fd/{fd}")
            with os.fdopen(os.dup(fd), "rb") as f:  # no /proc: copy it in
                return capi.Module.deserialize(engine, f.read())
        except capi.WasmtimeError:
            return None  # written by an incompatible build: recompile over it
        finally:
            os.close(fd)

    def init(self, args: str, log_level: str) -> None:
        if not self._prepared:
            raise EnclaveError("pal_init: the wasm runtime was not prepared")
        # After pivot_root the rootfs is "/": the same directory (a bind mount keeps device and inode).
        st = os.stat("/")
        if (st.st_dev, st.st_ino) == self._root_id:
            self._root_dir = "/"
            # The host cache is out of reach; a path of the same name would be the image's: modules first
            # loaded from now on (`clave exec` of another module) are compiled, not cached.
            self._cache = None
        elif os.path.isdir(self._rootfs):
            self._root_dir = self._rootfs  # not pivoted (tests, tools): preopen the rootfs by its path
        else:
            self._root_dir = "/"

    # -- processes --------------------------------------------------------------------------------------------

    def create_process(self, path: str, argv: list[str], env: list[str], stdio: tuple[int, int, int]) -> int:
        if not self._prepared:
            raise EnclaveError("pal_create_process: the wasm runtime was not prepared")
        language = self._language(path)
        preopens: dict[str, str] = {}
        if language is not None:
            loaded = self._load_language(language)
            argv = language.argv(argv, self._cwd)
            env, preopens = language.guest_env(env, self._cwd)
        else:
            loaded = self._load(path)
        with self._lock:
            if not loaded.engine_taken:
                loaded.engine_taken = True
                engine, module = loaded.engine, loaded.module
            else:  # one engine per process, so that an epoch interruption stops only that process
                if loaded.serialized is None:
                    loaded.serialized = loaded.module.serialize()
                engine = self._new_engine()
                module = capi.Module.deserialize(engine, loaded.serialized)
            pid = self._next_pid
            self._next_pid += 1
        identity = loaded.signed or self._identity
        signed_config = identity.enclave_config if identity is not None else measure.enclave_config(None)
        limits = measure.effective_limits(signed_config, self._oci_limits)
        wasi = capi.WasiConfig()
        try:
            wasi.set_argv(list(argv))
            wasi.set_env((name, value) for name, _, value in (entry.partition("=") for entry in env if "=" in entry))
            if stdio[0] == 0:
                wasi.inherit_stdin()
            else:
                wasi.set_stdin_file(f"/proc/self/fd/{stdio[0]}")
        except capi.WasmtimeError as exc:
            raise EnclaveError(f"pal_create_process: {exc}") from None
        for guest_fd, fd in ((1, stdio[1]), (2, stdio[2])):
            if fd == guest_fd:
                (wasi.inherit_stdout if guest_fd == 1 else wasi.inherit_stderr)()
            else:
                (wasi.set_stdout if guest_fd == 1 else wasi.set_stderr)(_fd_writer(fd))
        try:
            wasi.preopen_dir(self._root_dir, "/", mutable=not self._readonly)
            for guest in self._writable_mounts if self._readonly else ():  # writable below a read-only root
                host = resolve_in_root(self._root_dir, guest)
                if os.path.isdir(host):
                    wasi.preopen_dir(host, guest, mutable=True)
            for guest, host in preopens.items():
                wasi.preopen_dir(self._host_dir(host), guest, mutable=False)
        except capi.WasmtimeError as exc:
            raise EnclaveError(f"pal_create_process: cannot preopen {self._root_dir}: {exc}") from None
        store = capi.Store(engine, wasi)
        store.set_epoch_deadline(1)
        if limits["memory_limit"] is not None:
            store.set_memory_limit(limits["memory_limit"])
        process = _Process(pid, loaded, engine, module, store, stdio, limits["cpu_time_limit"])
        with self._lock:
            self._processes[pid] = process
        return pid

    def exec(self, pid: int) -> int:
        process = self._processes.get(pid)
        if process is None or process.started:
            raise EnclaveError(f"pal_exec: no enclave process {pid} waiting to run")
        process.started = True
        try:
            return self._run(process)
        finally:
            with self._lock:
                self._processes.pop(pid, None)

    def _run(self, process: _Process) -> int:
        if process.kill_signal is not None:
            return -process.kill_signal
        done = threading.Event()
        if process.cpu_time_limit is not None:
            clock = time.pthread_getcpuclockid(threading.get_ident())
            threading.Thread(target=_cpu_watchdog, args=(process, clock, done), name=f"wasm-cpu-{process.pid}",
                             daemon=True).start()
        try:
            linker = capi.Linker(process.engine)
            linker.define_wasi()
            instance = linker.instantiate(process.store, process.module)
            start = instance.get_func(process.store, "_start")
            if start is None:
                _say(process, f"{process.loaded.guest_path} exports no _start function: not a WASI command")
                return 126
            start.call(process.store)
            return 0
        except capi.Exit as exc:
            return exc.code
        except capi.WasmtimeError as exc:  # a trap, or an error from a host call
            if process.kill_signal is not None:
                return -process.kill_signal
            if process.cpu_exceeded:
                _say(process, f"CPU time limit exceeded ({process.cpu_time_limit} s)")
                return -signal.SIGXCPU
            _say(process, f"wasm trap: {exc.cause}")
            return -signal.SIGABRT
        finally:
            done.set()

    def kill(self, pid: int, sig: int) -> None:
        with self._lock:
            if pid == -1:
                targets = list(self._processes.values())
            elif pid in self._processes:
                targets = [self._processes[pid]]
            else:
                raise EnclaveError(f"pal_kill: no enclave process {pid}")
        if sig in NON_TERMINATING_SIGNALS or sig == 0:
            return
        for process in targets:
            if process.kill_signal is None:
                process.kill_signal = sig
            process.engine.increment_epoch()

    def destroy(self) -> None:
        self.kill(-1, signal.SIGKILL)
        with self._lock:
            self._processes.clear()
        self._modules.clear()
        self._main = None
        self._identity = None

    # -- identity and evidence ----------------------------------------------------------------------------------

    def measurement(self) -> dict[str, str]:
        if self._identity is None:
            return {}
        return {"mrenclave": self._identity.mrenclave.hex(), "mrsigner": self._identity.mrsigner.hex()}

    def local_report(self, target_info: bytes, report_data: bytes) -> bytes:
        if self._identity is None or self._platform_key is None:
            raise EnclaveError("pal_get_local_report: no enclave module is loaded")
        if len(report_data) > report.REPORT_DATA_SIZE:
            raise EnclaveError(f"pal_get_local_report: report data is {len(report_data)} bytes, "
                               f"at most {report.REPORT_DATA_SIZE} fit")
        return report.make_report(self._platform_key, self._identity.mrenclave, self._identity.mrsigner,
                                  report_data, target_info)


def _file_sha256(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _fd_writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return write


def _say(process: _Process, message: str) -> None:
    try:
        os.write(process.stdio[2], f"clave: {message}\n".encode())
    except OSError:
        pass


def _cpu_watchdog(process: _Process, clock: int, done: threading.Event) -> None:
    """Interrupt the guest once its thread has used its CPU-time budget."""
    assert process.cpu_time_limit is not None
    while not done.wait(WATCHDOG_INTERVAL):
        if time.clock_gettime(clock) >= process.cpu_time_limit:
            process.cpu_exceeded = True
            process.engine.increment_epoch()
            return
