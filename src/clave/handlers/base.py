"""The handler contract: what every handler (native, enclave, vm) implements and every caller (the engine, the
shim, the vm guest agent) uses. Nothing here depends on the engine, so a guest agent can run a handler too.

Two levels, as Kata's runtime-rs splits them: a ``Handler`` does every verb of one container (create through
destroy); a ``Sandbox`` is a pod's lifetime, owned by the shim, and the one place exits come from. What a
handler cannot do raises ``Unsupported``; the other errors are the classes in ``clave.errors``.
"""

from __future__ import annotations

import _thread  # not threading: `clave state` and `start` must not pay for its imports
from abc import ABC, abstractmethod

from clave.errors import Unsupported

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from typing import Any

    from clave.engine.state import State, StateDir

# Container status, as runtime-spec runtime.md names it (plus runc's "paused").
STATUSES = ("creating", "created", "running", "paused", "stopped")


class CreateOptions:
    def __init__(
        self, bundle: str, pid_file: str | None = None, console_socket: str | None = None, no_pivot: bool = False,
        preserve_fds: int = 0, listen_fds: int = 0, detach_check: bool = True,
        stdio: tuple[int, int, int] | None = None,
    ) -> None:
        self.bundle = bundle
        self.stdio = stdio  # the container's stdin/stdout/stderr; None: this process's own (the CLI's way)
        self.pid_file = pid_file
        self.console_socket = console_socket  # runc's protocol: the pty master is sent over it
        self.no_pivot = no_pivot
        self.preserve_fds = preserve_fds
        self.listen_fds = listen_fds
        self.detach_check = detach_check  # terminal containers need a console socket (create / run --detach)


class ExecOptions:
    def __init__(
        self, console_socket: str | None = None, pid_file: str | None = None, preserve_fds: int = 0,
        ignore_paused: bool = False, stdio: tuple[int, int, int] | None = None, source: str = "exec",
    ) -> None:
        self.stdio = stdio  # as CreateOptions.stdio
        self.console_socket = console_socket
        self.pid_file = pid_file
        self.preserve_fds = preserve_fds
        self.ignore_paused = ignore_paused
        self.source = source  # where the process came from, for its validation errors (a --process file...)


class Exit:
    """A process of a container ended."""

    __slots__ = ("pid", "status", "at_ns")

    def __init__(self, pid: int, status: int, at_ns: int) -> None:
        self.pid = pid
        self.status = status  # shell-style: the exit code, or 128 + signal
        self.at_ns = at_ns


class Sandbox:
    """A pod: the containers one shim serves. ``start(on_exit)`` begins delivering every Exit of their
    processes; ``quiet`` is held around handler calls that wait for children of their own (so a reaper does
    not take their statuses); ``stop`` ends the sandbox (for a VM: the VM)."""

    def __init__(self) -> None:
        self.quiet: AbstractContextManager[Any] = _thread.RLock()

    def start(self, on_exit: Callable[[Exit], None]) -> None:
        """Begin delivering exits to ``on_exit`` (from another thread)."""

    def stop(self) -> None:
        """End the sandbox once its last container is gone."""


class Handler(ABC):
    """Every verb of one container. ``state`` is the engine's record (generic fields plus ``state.handler_state``,
    which only the handler reads and writes); ``sd`` its state directory, locked by the engine around each
    call that changes something."""

    name = "base"
    log: Any = None  # the caller's logger (clave.logs.Logger), set by the engine

    def debug(self, message: str) -> None:
        """Progress and timings for the debug log (`--debug`), never shown otherwise."""
        if self.log is not None:
            self.log.debug(message)

    # -- create and its undoing
    def prepare(self, state: State, notice: Callable[[str], None]) -> None:
        """Validate and adjust the container before anything is created (may fill state.handler_state);
        ``notice`` reaches the user's log (warnings, progress of slow work)."""
        return None

    @abstractmethod
    def create(self, state: State, sd: StateDir, opts: CreateOptions, runtime_hooks: Callable[[int], None],
               notice: Callable[[str], None]) -> int:
        """Build the container up to "created" (its process waits for start); returns the pid callers see.
        ``runtime_hooks(pid)`` runs the prestart and createRuntime hooks at the point the spec puts them.
        Records what ``destroy`` needs in state.handler_state and saves it (sd.save) before making anything,
        so a crash at any step can be undone."""

    @abstractmethod
    def destroy(self, state: State, sd: StateDir, notice: Callable[[str], None]) -> None:
        """Undo create from whatever state it reached: stop every process, remove everything made outside the
        state directory. Idempotent; reports what it could not remove through ``notice``."""

    # -- lifecycle
    @abstractmethod
    def start(self, state: State, sd: StateDir) -> None:
        """Run the container's program (created → running); raises with the program's own error if it cannot."""

    @abstractmethod
    def status(self, state: State, sd: StateDir) -> str:
        """One of STATUSES, derived from the live container, never trusted from a file."""

    @abstractmethod
    def kill(self, state: State, sig: int, all_processes: bool = False) -> None:
        """Signal the container's init (or every process of it)."""

    def wait(self, state: State, pid: int) -> int:
        """Block until process ``pid`` of the container ends; its status (shell-style). The caller must be
        entitled to its exit (for Linux processes: their subreaper)."""
        raise Unsupported(f"{self.name} containers cannot be waited for here")

    # -- processes
    def exec(self, state: State, sd: StateDir, process: dict[str, Any], opts: ExecOptions) -> int:
        """Start ``process`` (an OCI process object) in the running container; its pid once it runs."""
        raise Unsupported(f"exec into a {self.name} container is not supported")

    def signal_process(self, state: State, pid: int, sig: int) -> None:
        """Signal one process (an exec'd one) of the container."""
        raise Unsupported(f"signalling a process of a {self.name} container is not supported")

    def pids(self, state: State) -> list[int]:
        raise Unsupported(f"listing the processes of a {self.name} container is not supported")

    # -- resources
    def pause(self, state: State) -> None:
        raise Unsupported(f"pausing a {self.name} container is not supported")

    def resume(self, state: State) -> None:
        raise Unsupported(f"resuming a {self.name} container is not supported")

    def update(self, state: State, resources: dict[str, Any], notice: Callable[[str], None]) -> None:
        raise Unsupported(f"updating the resources of a {self.name} container is not supported")

    def stats(self, state: State) -> dict[str, Any]:
        """runc's `events --stats` data: cpu, memory, pids, blkio, hugetlb, network_interfaces."""
        raise Unsupported(f"statistics of a {self.name} container are not supported")

    def stats_format(self) -> str:
        """"v2" when ``stats`` come from cgroup v2 alone (containerd then expects its v2 Metrics), else "v1"."""
        return "v1"

    def oom_count(self, state: State) -> int:
        """How many processes of the container the OOM killer has killed so far."""
        return 0

    # -- the rootfs a shim is given (containerd's snapshot mounts) and requests beyond the OCI verbs
    def attach_rootfs(self, bundle: str, mounts: list[dict[str, Any]]) -> str | None:
        """Make containerd's rootfs ``mounts`` (type, source, options) the bundle's rootfs; what to detach."""
        if mounts:
            raise Unsupported(f"{self.name} containers cannot take a rootfs from mounts")
        return None

    def detach_rootfs(self, attached: str | None) -> None:
        """Undo attach_rootfs (also after a crash: ``attached`` is what it returned)."""
        return None

    def request(self, state: State, sd: StateDir, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A request to the container's runtime beyond the OCI verbs: {"op": "attest" | "kbs", ...}."""
        raise Unsupported(f"container {state.id} is not an enclave container: nothing to attest")

    def describe(self, state: State) -> dict[str, Any]:
        """Fields this handler adds to `clave state` (an enclave's type and whether it is insecure...)."""
        return {}

    # -- the pod
    def sandbox(self, sandbox_id: str) -> Sandbox:
        """The pod-level object a shim owns for the containers of one pod."""
        return Sandbox()
