"""The Enclave Runtime PAL API as an object: what a container's init drives instead of execve.

Two families implement it: ``clave.enclave.pal.PalRuntime`` loads a C PAL (``liberpal-*.so``, API v1-v3)
through ctypes; ``clave.enclave.wasm`` is the built-in WebAssembly enclave runtime. Return codes of the C API
become ``EnclaveError`` with the errno's message.
"""

from __future__ import annotations


class EnclaveError(Exception):
    """An enclave runtime failed; one line naming the call (``pal_init: Invalid argument``)."""


class EnclaveRuntime:
    """The interface the enclave handler drives, in the container's init."""

    name = "base"
    api_version = 3
    insecure = False  # true when no hardware TEE protects the enclave (software and wasm types)

    def prepare(self, rootfs: str, config: dict[str, object]) -> None:
        """In the init, before pivot_root, while host paths still resolve: load and check what will run
        (libraries, modules, signatures, caches). Must not start threads: the init forks no more, but
        ``prepare`` runs before the exec fifo wait."""

    def init(self, args: str, log_level: str) -> None:
        """pal_init: called inside the container (after pivot_root), once."""
        raise NotImplementedError

    def create_process(self, path: str, argv: list[str], env: list[str], stdio: tuple[int, int, int]) -> int:
        """pal_create_process (v2+): returns the enclave process id. v1 runtimes remember the arguments."""
        raise NotImplementedError

    def exec(self, pid: int) -> int:
        """pal_exec: run the process to completion; returns its exit value."""
        raise NotImplementedError

    def kill(self, pid: int, sig: int) -> None:
        """pal_kill: deliver ``sig`` (pid -1 = every enclave process). May be called from a signal handler."""
        raise NotImplementedError

    def destroy(self) -> None:
        """pal_destroy."""

    def measurement(self) -> dict[str, str]:
        """Identity of what runs: at least ``mrenclave`` and ``mrsigner`` (hex), when the runtime knows them."""
        return {}

    def local_report(self, target_info: bytes, report_data: bytes) -> bytes:
        """pal_get_local_report (v3): evidence over the enclave identity and ``report_data``."""
        raise EnclaveError("this enclave runtime cannot produce a local report")
