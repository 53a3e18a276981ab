"""Loading a C enclave runtime (``liberpal-*.so``) through the Enclave Runtime PAL API v1, v2 and v3.

No ``pal_get_version`` symbol means v1. Every call returns 0 or a negative errno, turned into EnclaveError.
The structures follow the C ABI real PALs are compiled with: natural alignment, not packed (in the v2 exec
arguments ``exit_value`` sits at offset 8; in the v3 init attributes ``addr`` sits at offset 24).
"""

from __future__ import annotations

import ctypes
import os

from clave.enclave.runtime import EnclaveError, EnclaveRuntime


class PalAttrV1(ctypes.Structure):
    _fields_ = [("args", ctypes.c_char_p), ("log_level", ctypes.c_char_p)]


class PalAttrV3(ctypes.Structure):
    _fields_ = [("attr_v1", PalAttrV1), ("fd", ctypes.c_int), ("addr", ctypes.c_uint64)]


class PalStdioFds(ctypes.Structure):
    _fields_ = [("stdin", ctypes.c_int), ("stdout", ctypes.c_int), ("stderr", ctypes.c_int)]


class PalCreateProcessArgs(ctypes.Structure):
    _fields_ = [
        ("path", ctypes.c_char_p),
        ("argv", ctypes.POINTER(ctypes.c_char_p)),
        ("env", ctypes.POINTER(ctypes.c_char_p)),
        ("stdio", ctypes.POINTER(PalStdioFds)),
        ("pid", ctypes.POINTER(ctypes.c_int)),
    ]


class PalExecArgs(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_int), ("exit_value", ctypes.POINTER(ctypes.c_int))]


def _strings(items: list[str]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated char *[] (the array keeps its strings alive)."""
    array = (ctypes.c_char_p * (len(items) + 1))(*[s.encode() for s in items], None)
    return array


class PalRuntime(EnclaveRuntime):
    """A PAL shared object, dlopen'ed in the init before pivot_root and driven after it."""

    name = "pal"

    def __init__(self, path: str, enclave_type: str, device_fd: int = -1) -> None:
        self.path = path
        self.enclave_type = enclave_type
        self.insecure = enclave_type == "software"
        self.device_fd = device_fd
        self._lib: ctypes.CDLL | None = None
        self._keep: list[object] = []  # ctypes buffers the PAL may still point to (v1 exec arguments)
        self._v1_process: tuple[bytes, ctypes.Array[ctypes.c_char_p], PalStdioFds] | None = None

    # -- loading
    def prepare(self, rootfs: str, config: dict[str, object]) -> None:
        try:
            self._lib = ctypes.CDLL(self.path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as exc:
            raise EnclaveError(f"load enclave runtime {self.path}: {exc}") from None
        self.api_version = self._version()
        required = {1: ("pal_init", "pal_exec"), 2: ("pal_init", "pal_create_process", "pal_exec")}
        for symbol in required.get(self.api_version, required[2]):
            if not hasattr(self._lib, symbol):
                raise EnclaveError(f"enclave runtime {self.path} (PAL API v{self.api_version}) lacks {symbol}()")

    def _version(self) -> int:
        assert self._lib is not None
        try:
            get_version = self._lib.pal_get_version
        except AttributeError:
            return 1
        get_version.restype = ctypes.c_int
        get_version.argtypes = []
        version = int(get_version())
        if version < 1:
            raise EnclaveError(f"enclave runtime {self.path}: pal_get_version() returned {version}")
        return min(version, 3)  # newer PALs are driven through the v3 calls they must still offer

    def _call(self, name: str, *args: object) -> None:
        assert self._lib is not None
        func = getattr(self._lib, name)
        func.restype = ctypes.c_int
        result = int(func(*args))
        if result < 0:
            raise EnclaveError(f"{name}: {os.strerror(-result)} (errno {-result})")
        if result > 0 and name != "pal_get_local_report":
            raise EnclaveError(f"{name}: failed with {result}")

    # -- the PAL API
    def init(self, args: str, log_level: str) -> None:
        attr_v1 = PalAttrV1(args.encode(), log_level.encode())
        if self.api_version >= 3:
            attr = PalAttrV3(attr_v1, self.device_fd, 0)
            self._keep.append(attr)
            self._call("pal_init", ctypes.byref(attr))
        else:
            self._keep.append(attr_v1)
            self._call("pal_init", ctypes.byref(attr_v1))

    def create_process(self, path: str, argv: list[str], env: list[str], stdio: tuple[int, int, int]) -> int:
        fds = PalStdioFds(*stdio)
        if self.api_version == 1:
            # v1 has no separate create: remember what pal_exec will run.
            self._v1_process = (path.encode(), _strings(argv), fds)
            return 0
        c_argv, c_env, pid = _strings(argv), _strings(env), ctypes.c_int(0)
        args = PalCreateProcessArgs(path.encode(), c_argv, c_env, ctypes.pointer(fds), ctypes.pointer(pid))
        self._keep.extend((c_argv, c_env, fds, args))
        self._call("pal_create_process", ctypes.byref(args))
        return pid.value

    def exec(self, pid: int) -> int:
        exit_value = ctypes.c_int(0)
        if self.api_version == 1:
            assert self._v1_process is not None, "create_process must come first"
            path, argv, fds = self._v1_process
            self._call("pal_exec", path, argv, ctypes.byref(fds), ctypes.byref(exit_value))
        else:
            args = PalExecArgs(pid, ctypes.pointer(exit_value))
            self._call("pal_exec", ctypes.byref(args))
        return exit_value.value

    def kill(self, pid: int, sig: int) -> None:
        assert self._lib is not None
        if not hasattr(self._lib, "pal_kill"):
            raise EnclaveError("this enclave runtime has no pal_kill()")
        self._call("pal_kill", ctypes.c_int(pid), ctypes.c_int(sig))

    @property
    def can_kill(self) -> bool:
        return self._lib is not None and hasattr(self._lib, "pal_kill")

    def destroy(self) -> None:
        if self._lib is not None and hasattr(self._lib, "pal_destroy"):
            self._call("pal_destroy")

    def local_report(self, target_info: bytes, report_data: bytes) -> bytes:
        if self.api_version < 3 or self._lib is None or not hasattr(self._lib, "pal_get_local_report"):
            raise EnclaveError("pal_get_local_report needs a PAL API v3 enclave runtime")
        if any(report_data):
            # The v3 call has no report-data argument: the enclave chooses it. Refuse rather than pretend to bind.
            raise EnclaveError("pal_get_local_report (PAL API v3) takes no report data: it cannot bind a nonce")
        target = ctypes.create_string_buffer(target_info, len(target_info))
        report = ctypes.create_string_buffer(4096)
        length = ctypes.c_int(len(report))
        self._call("pal_get_local_report", target, ctypes.c_int(len(target_info)), report, ctypes.byref(length))
        return report.raw[: length.value]
