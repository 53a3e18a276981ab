"""A small ctypes binding to wasmtime's C API: only what the enclave runtime and its compiler use.

It loads the very library the wasmtime Python package ships (``wasmtime/<platform>-<machine>/_libwasmtime.so``,
found on ``sys.path``) without importing that package: importing it declares about a thousand C functions and
pulls in typing, enum, pathlib and platform (~50 ms), paid by every enclave container start. This module imports
only ``ctypes`` (the init has it already), loads the library on ``load()`` (the init calls it before pivot_root:
the package files are out of reach afterwards) and declares its few functions then, from one table.

Layouts and signatures are wasmtime 50's C API (``wasm.h``, ``wasi.h``, ``wasmtime/*.h``). Every object owns its
C handle and frees it on ``close()`` or when collected. Failures raise ``WasmtimeError`` (``Exit`` for WASI's
``proc_exit``, ``Trap`` for a trap), whose ``str()`` is one line.
"""

from __future__ import annotations

import ctypes
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

# wasmtime_opt_level_t and wasmtime_trap_code_t values (wasmtime/config.h, wasmtime/trap.h).
API_MAJOR = 50  # the wasmtime whose C API these layouts and signatures are
OPT_LEVELS = {"none": 0, "speed": 1, "speed_and_size": 2}
TRAP_CODE_INTERRUPT = 10
EXTERN_FUNC = 0  # wasmtime_extern_kind_t
NO_LIMIT = -1  # for wasmtime_store_limiter: leave that limit unset
EIO = 5


class WasmtimeError(Exception):
    """A wasmtime failure. ``str()`` is one line; ``detail`` is wasmtime's full message (backtrace, causes) and
    ``cause`` its innermost cause alone."""

    def __init__(self, message: str) -> None:
        self.detail = message
        lines = [line.strip() for line in message.strip().split("\n") if line.strip()]
        if lines and lines[0] == "error while executing at wasm backtrace:":
            lines = lines[1:]  # the frames, then "Caused by:": keep only the causes
            while lines and lines[0] != "Caused by:":
                lines.pop(0)
        causes = [_unnumbered(line) for line in lines if line != "Caused by:"] or ["unknown error"]
        self.cause = causes[-1].removeprefix("wasm trap: ")
        super().__init__(": ".join(causes))


class Exit(WasmtimeError):
    """The guest called WASI ``proc_exit(code)`` (wasmtime accepts codes below 126 only: others are errors)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Trap(WasmtimeError):
    """A WebAssembly trap; ``interrupted`` when it is the epoch deadline (``Engine.increment_epoch``)."""

    def __init__(self, message: str, interrupted: bool) -> None:
        super().__init__(message)
        self.interrupted = interrupted


def _unnumbered(line: str) -> str:
    """A cause line without anyhow's "N: " prefix."""
    number, sep, rest = line.partition(": ")
    return rest if sep and number.isdigit() else line


# -- the library and its functions ----------------------------------------------------------------------------


class _ByteVec(ctypes.Structure):  # wasm_byte_vec_t (also wasm_name_t, wasm_message_t)
    _fields_ = [("size", ctypes.c_size_t), ("data", ctypes.c_void_p)]


class _Func(ctypes.Structure):  # wasmtime_func_t
    _fields_ = [("store_id", ctypes.c_uint64), ("private", ctypes.c_size_t)]


class _Instance(ctypes.Structure):  # wasmtime_instance_t
    _fields_ = [("store_id", ctypes.c_uint64), ("private", ctypes.c_size_t)]


class _ExternUnion(ctypes.Union):  # wasmtime_extern_union_t: its largest members are 24 bytes, 8-aligned
    _fields_ = [("func", _Func), ("bytes", ctypes.c_uint64 * 3)]


class _Extern(ctypes.Structure):  # wasmtime_extern_t
    _fields_ = [("kind", ctypes.c_uint8), ("of", _ExternUnion)]


_P = ctypes.c_void_p  # every C object is an opaque pointer here
_OUTPUT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_OUT_P = ctypes.POINTER(ctypes.c_void_p)
_BYTES = ctypes.c_char_p  # const uint8_t * / const char *: Python bytes are passed without a copy

# name: (restype, argtypes)
_FUNCTIONS: dict[str, tuple[object, tuple[object, ...]]] = {
    "wasm_byte_vec_delete": (None, (ctypes.POINTER(_ByteVec),)),
    "wasm_config_new": (_P, ()),
    "wasm_config_delete": (None, (_P,)),
    "wasmtime_config_epoch_interruption_set": (None, (_P, ctypes.c_bool)),
    "wasmtime_config_cranelift_opt_level_set": (None, (_P, ctypes.c_uint8)),
    "wasmtime_config_parallel_compilation_set": (None, (_P, ctypes.c_bool)),
    "wasm_engine_new_with_config": (_P, (_P,)),  # takes ownership of the config
    "wasm_engine_delete": (None, (_P,)),
    "wasmtime_engine_increment_epoch": (None, (_P,)),
    "wasmtime_error_message": (None, (_P, ctypes.POINTER(_ByteVec))),
    "wasmtime_error_exit_status": (ctypes.c_bool, (_P, ctypes.POINTER(ctypes.c_int))),
    "wasmtime_error_delete": (None, (_P,)),
    "wasm_trap_message": (None, (_P, ctypes.POINTER(_ByteVec))),
    "wasmtime_trap_code": (ctypes.c_bool, (_P, ctypes.POINTER(ctypes.c_uint8))),
    "wasm_trap_delete": (None, (_P,)),
    "wasmtime_module_new": (_P, (_P, _BYTES, ctypes.c_size_t, _OUT_P)),
    "wasmtime_module_serialize": (_P, (_P, ctypes.POINTER(_ByteVec))),
    "wasmtime_module_deserialize": (_P, (_P, _BYTES, ctypes.c_size_t, _OUT_P)),
    "wasmtime_module_deserialize_file": (_P, (_P, _BYTES, _OUT_P)),
    "wasmtime_module_delete": (None, (_P,)),
    "wasi_config_new": (_P, ()),
    "wasi_config_delete": (None, (_P,)),
    "wasi_config_set_argv": (ctypes.c_bool, (_P, ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p))),
    "wasi_config_set_env": (ctypes.c_bool, (_P, ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p),
                                            ctypes.POINTER(ctypes.c_char_p))),
    "wasi_config_set_stdin_file": (ctypes.c_bool, (_P, _BYTES)),
    "wasi_config_inherit_stdin": (None, (_P,)),
    "wasi_config_inherit_stdout": (None, (_P,)),
    "wasi_config_inherit_stderr": (None, (_P,)),
    "wasi_config_set_stdout_custom": (None, (_P, _OUTPUT_CALLBACK, _P, _FINALIZER)),
    "wasi_config_set_stderr_custom": (None, (_P, _OUTPUT_CALLBACK, _P, _FINALIZER)),
    "wasi_config_preopen_dir": (ctypes.c_bool, (_P, _BYTES, _BYTES, ctypes.c_bool)),
    "wasmtime_store_new": (_P, (_P, _P, _FINALIZER)),
    "wasmtime_store_context": (_P, (_P,)),
    "wasmtime_store_limiter": (None, (_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64)),
    "wasmtime_store_delete": (None, (_P,)),
    "wasmtime_context_set_wasi": (_P, (_P, _P)),  # takes ownership of the WASI config, even on error
    "wasmtime_context_set_epoch_deadline": (None, (_P, ctypes.c_uint64)),
    "wasmtime_linker_new": (_P, (_P,)),
    "wasmtime_linker_define_wasi": (_P, (_P,)),
    "wasmtime_linker_instantiate": (_P, (_P, _P, _P, ctypes.POINTER(_Instance), _OUT_P)),
    "wasmtime_linker_delete": (None, (_P,)),
    "wasmtime_instance_export_get": (ctypes.c_bool, (_P, ctypes.POINTER(_Instance), _BYTES, ctypes.c_size_t,
                                                     ctypes.POINTER(_Extern))),
    "wasmtime_extern_delete": (None, (ctypes.POINTER(_Extern),)),
    "wasmtime_func_call": (_P, (_P, ctypes.POINTER(_Func), _P, ctypes.c_size_t, _P, ctypes.c_size_t, _OUT_P)),
}

_lib: ctypes.CDLL | None = None
_package_dir: str | None = None


def package_dir() -> str | None:
    """The installed wasmtime Python package's directory (found on sys.path, not imported), or None."""
    global _package_dir
    if _package_dir is None:
        _package_dir = next((os.path.join(p, "wasmtime") for p in sys.path
                             if p and os.path.isfile(os.path.join(p, "wasmtime", "__init__.py"))), None)
    return _package_dir


def installed_versions(directory: str) -> list[str]:
    """The versions of the wasmtime package in ``directory``, from the dist-info beside it (sorted; none when
    unknown)."""
    site = os.path.dirname(directory)
    names = os.listdir(site) if site and os.path.isdir(site) else []
    return sorted(n[len("wasmtime-"):-len(".dist-info")] for n in names
                  if n.startswith("wasmtime-") and n.endswith(".dist-info"))


def installed_major(directory: str) -> int | None:
    """The major version of the wasmtime package in ``directory`` (None: unknown)."""
    versions = installed_versions(directory)
    major = versions[0].split(".")[0] if versions else ""
    return int(major) if major.isdigit() else None


def library_path(directory: str | None = None) -> str:
    """The native library inside the wasmtime package (``directory``, default: the installed one)."""
    machine = os.uname().machine
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    return os.path.join(directory or package_dir() or "", f"{sys.platform}-{machine}", "_libwasmtime.so")


def load() -> ctypes.CDLL:
    """Load the library and declare its functions (once): before pivot_root, while the package is reachable."""
    global _lib
    if _lib is None:
        directory = package_dir()
        if directory is None:
            raise WasmtimeError("wasmtime is not installed: no wasmtime package on sys.path")
        installed = installed_major(directory)
        if installed not in (None, API_MAJOR):
            raise WasmtimeError(f"wasmtime {installed} is installed, but this binding speaks wasmtime {API_MAJOR}'s "
                                f"C API (struct layouts change between majors): install wasmtime=={API_MAJOR}.*")
        try:
            lib = ctypes.CDLL(library_path())
        except OSError as exc:
            raise WasmtimeError(f"cannot load wasmtime's library: {exc}") from None
        for name, (restype, argtypes) in _FUNCTIONS.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
        _lib = lib
    return _lib


def _message(lib: ctypes.CDLL, function: str, handle: int) -> str:
    """The message of an error or trap (``function`` fills a byte vector, which this frees)."""
    vec = _ByteVec()
    getattr(lib, function)(handle, ctypes.byref(vec))
    try:
        return ctypes.string_at(vec.data, vec.size).decode("utf-8", "replace").rstrip("\0")  # a trap's ends in NUL
    finally:
        lib.wasm_byte_vec_delete(ctypes.byref(vec))


def _error(handle: int) -> WasmtimeError:
    """The exception for an owned wasmtime_error_t, which this frees."""
    lib = load()
    try:
        message = _message(lib, "wasmtime_error_message", handle)
        status = ctypes.c_int(0)
        if lib.wasmtime_error_exit_status(handle, ctypes.byref(status)):
            return Exit(message, status.value)
        return WasmtimeError(message)
    finally:
        lib.wasmtime_error_delete(handle)


def _trap(handle: int) -> Trap:
    """The exception for an owned wasm_trap_t, which this frees."""
    lib = load()
    try:
        code = ctypes.c_uint8(0)
        interrupted = bool(lib.wasmtime_trap_code(handle, ctypes.byref(code))) and code.value == TRAP_CODE_INTERRUPT
        return Trap(_message(lib, "wasm_trap_message", handle), interrupted)
    finally:
        lib.wasm_trap_delete(handle)


def _check(error: int | None, trap: ctypes.c_void_p | None = None) -> None:
    if error:
        if trap is not None and trap.value:
            load().wasm_trap_delete(trap.value)  # not expected with an error, but it is owned
        raise _error(error)
    if trap is not None and trap.value:
        raise _trap(trap.value)


class _Owned:
    """Owns one C handle, freed by ``_delete`` on close() or collection."""

    _delete = ""
    _handle: int | None = None

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle and _lib is not None:
            getattr(_lib, self._delete)(handle)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - interpreter shutdown: nothing left to free into
            pass

    @property
    def handle(self) -> int:
        if not self._handle:
            raise WasmtimeError(f"{type(self).__name__} is closed")
        return self._handle


# -- the objects ------------------------------------------------------------------------------------------------


class Engine(_Owned):
    """A wasmtime engine (its configuration is fixed at creation)."""

    _delete = "wasm_engine_delete"

    def __init__(self, epoch_interruption: bool = False, opt_level: str = "speed",
                 parallel_compilation: bool = True) -> None:
        lib = load()
        if opt_level not in OPT_LEVELS:
            raise WasmtimeError(f"unknown optimization level {opt_level!r} (one of {', '.join(OPT_LEVELS)})")
        config = lib.wasm_config_new()
        lib.wasmtime_config_epoch_interruption_set(config, epoch_interruption)
        lib.wasmtime_config_cranelift_opt_level_set(config, OPT_LEVELS[opt_level])
        lib.wasmtime_config_parallel_compilation_set(config, parallel_compilation)
        engine = lib.wasm_engine_new_with_config(config)
        if not engine:
            raise WasmtimeError("cannot create a wasmtime engine with this configuration")
        self._handle = engine

    def increment_epoch(self) -> None:
        """Advance the epoch: a guest past its deadline traps (interrupted). Safe from any thread."""
        load().wasmtime_engine_increment_epoch(self.handle)


class Module(_Owned):
    """A compiled module."""

    _delete = "wasmtime_module_delete"

    def __init__(self, engine: Engine, wasm: bytes | bytearray) -> None:
        """Compile a WebAssembly binary."""
        out = ctypes.c_void_p()
        binary = _immutable(wasm)
        _check(load().wasmtime_module_new(engine.handle, binary, len(binary), ctypes.byref(out)))
        self._handle = out.value
        self.engine = engine

    @classmethod
    def _made(cls, engine: Engine, handle: int | None) -> Module:
        module = cls.__new__(cls)
        module._handle = handle
        module.engine = engine
        return module

    @classmethod
    def deserialize(cls, engine: Engine, serialized: bytes | bytearray) -> Module:
        """A module from ``serialize()``'s output, made by a compatible engine (else WasmtimeError)."""
        out = ctypes.c_void_p()
        data = _immutable(serialized)
        _check(load().wasmtime_module_deserialize(engine.handle, data, len(data), ctypes.byref(out)))
        return cls._made(engine, out.value)

    @classmethod
    def deserialize_file(cls, engine: Engine, path: str) -> Module:
        """Like ``deserialize``, the file mapped into memory rather than read."""
        out = ctypes.c_void_p()
        _check(load().wasmtime_module_deserialize_file(engine.handle, os.fsencode(path), ctypes.byref(out)))
        return cls._made(engine, out.value)

    def serialize(self) -> bytes:
        vec = _ByteVec()
        lib = load()
        _check(lib.wasmtime_module_serialize(self.handle, ctypes.byref(vec)))
        try:
            return ctypes.string_at(vec.data, vec.size)
        finally:
            lib.wasm_byte_vec_delete(ctypes.byref(vec))


def _immutable(data: bytes | bytearray) -> bytes:
    """``data`` as bytes, which ctypes hands to C without a copy (a bytearray is copied once)."""
    return data if type(data) is bytes else bytes(data)


def _output_callback(write: Callable[[bytes], int | None]) -> ctypes._CFunctionType:
    """A C stdout/stderr callback calling ``write(data)``, which returns the bytes written (None: all). It runs
    on one of wasmtime's threads."""

    def call(_data: int | None, pointer: int | None, size: int) -> int:
        try:
            written = write(ctypes.string_at(pointer, size) if pointer and size else b"")
            # wasmtime aborts the process on a count above the size
            return size if written is None else max(0, min(int(written), size))
        except OSError as exc:
            return -(exc.errno or EIO)
        except Exception:  # an exception cannot cross into wasmtime: the guest's write fails instead
            return -EIO

    return _OUTPUT_CALLBACK(call)


def _strings(values: list[str]) -> ctypes.Array[ctypes.c_char_p]:
    """C strings; undecodable bytes (surrogate escapes) pass through, for wasmtime to refuse as not UTF-8."""
    return (ctypes.c_char_p * max(len(values), 1))(*(os.fsencode(value) for value in values))


class WasiConfig(_Owned):
    """WASI preview 1 settings for one store (which takes them over: ``Store(engine, wasi)``)."""

    _delete = "wasi_config_delete"

    def __init__(self) -> None:
        self._handle = load().wasi_config_new()
        self.callbacks: list[ctypes._CFunctionType] = []  # C callbacks wasmtime may call: kept alive

    def set_argv(self, argv: list[str]) -> None:
        if not load().wasi_config_set_argv(self.handle, len(argv), _strings(argv)):
            raise WasmtimeError("cannot set the WASI argv (an argument is not valid UTF-8)")

    def set_env(self, env: Iterable[tuple[str, str]]) -> None:
        pairs = list(env)
        names, values = _strings([name for name, _ in pairs]), _strings([value for _, value in pairs])
        if not load().wasi_config_set_env(self.handle, len(pairs), names, values):
            raise WasmtimeError("cannot set the WASI environment (an entry is not valid UTF-8)")

    def inherit_stdin(self) -> None:
        load().wasi_config_inherit_stdin(self.handle)

    def set_stdin_file(self, path: str) -> None:
        if not load().wasi_config_set_stdin_file(self.handle, os.fsencode(path)):
            raise WasmtimeError(f"cannot open {path} as the WASI stdin")

    def inherit_stdout(self) -> None:
        load().wasi_config_inherit_stdout(self.handle)

    def inherit_stderr(self) -> None:
        load().wasi_config_inherit_stderr(self.handle)

    def set_stdout(self, write: Callable[[bytes], int | None]) -> None:
        """Send the guest's stdout to ``write(data)`` (returns the bytes written, None for all; OSError fails
        the guest's write with that errno)."""
        self.callbacks.append(_output_callback(write))
        load().wasi_config_set_stdout_custom(self.handle, self.callbacks[-1], None, _FINALIZER())

    def set_stderr(self, write: Callable[[bytes], int | None]) -> None:
        """Like ``set_stdout``, for stderr."""
        self.callbacks.append(_output_callback(write))
        load().wasi_config_set_stderr_custom(self.handle, self.callbacks[-1], None, _FINALIZER())

    def preopen_dir(self, host_path: str, guest_path: str, mutable: bool) -> None:
        """Give the guest ``host_path`` as ``guest_path``: read-only unless ``mutable``."""
        if not load().wasi_config_preopen_dir(self.handle, os.fsencode(host_path), guest_path.encode(), mutable):
            raise WasmtimeError(f"cannot preopen {host_path} as {guest_path}")


class Store(_Owned):
    """A store: the guest's instances, memory and WASI state."""

    _delete = "wasmtime_store_delete"

    def __init__(self, engine: Engine, wasi: WasiConfig | None = None) -> None:
        lib = load()
        self._handle = lib.wasmtime_store_new(engine.handle, None, _FINALIZER())
        self.context: int = lib.wasmtime_store_context(self._handle)
        self.engine = engine
        self.callbacks: list[ctypes._CFunctionType] = []
        if wasi is not None:
            self.set_wasi(wasi)

    def set_wasi(self, wasi: WasiConfig) -> None:
        """Use these WASI settings; the store takes them over (``wasi`` is closed)."""
        config, wasi._handle = wasi.handle, None
        self.callbacks += wasi.callbacks
        _check(load().wasmtime_context_set_wasi(self.context, config))

    def set_epoch_deadline(self, ticks: int) -> None:
        """Trap (interrupted) once the engine's epoch is ``ticks`` past the current one."""
        load().wasmtime_context_set_epoch_deadline(self.context, ticks)

    def set_memory_limit(self, size: int) -> None:
        """Cap linear memory at ``size`` bytes: ``memory.grow`` beyond it returns -1."""
        load().wasmtime_store_limiter(self.handle, size, NO_LIMIT, NO_LIMIT, NO_LIMIT, NO_LIMIT)


class Func:
    """An exported function of an instance (no C handle to free: an index into its store)."""

    def __init__(self, func: _Func) -> None:
        self._func = func

    def call(self, store: Store) -> None:
        """Call it with no arguments and no results (a WASI command's ``_start``)."""
        trap = ctypes.c_void_p()
        _check(load().wasmtime_func_call(store.context, ctypes.byref(self._func), None, 0, None, 0,
                                         ctypes.byref(trap)), trap)


class Instance:
    """An instantiated module (no C handle to free: an index into its store)."""

    def __init__(self, instance: _Instance) -> None:
        self._instance = instance

    def get_func(self, store: Store, name: str) -> Func | None:
        """The exported function ``name``, or None when there is no such export or it is not a function."""
        item = _Extern()
        encoded = name.encode()
        lib = load()
        if not lib.wasmtime_instance_export_get(store.context, ctypes.byref(self._instance), encoded, len(encoded),
                                                ctypes.byref(item)):
            return None
        try:
            if item.kind != EXTERN_FUNC:
                return None
            return Func(_Func(item.of.func.store_id, item.of.func.private))
        finally:
            lib.wasmtime_extern_delete(ctypes.byref(item))


class Linker(_Owned):
    """Resolves a module's imports (here: WASI preview 1) and instantiates it."""

    _delete = "wasmtime_linker_delete"

    def __init__(self, engine: Engine) -> None:
        self._handle = load().wasmtime_linker_new(engine.handle)
        self.engine = engine

    def define_wasi(self) -> None:
        _check(load().wasmtime_linker_define_wasi(self.handle))

    def instantiate(self, store: Store, module: Module) -> Instance:
        """Instantiate ``module`` in ``store`` (running its start function, if any)."""
        instance = _Instance()
        trap = ctypes.c_void_p()
        _check(load().wasmtime_linker_instantiate(self.handle, store.context, module.handle, ctypes.byref(instance),
                                                  ctypes.byref(trap)), trap)
        return Instance(instance)
