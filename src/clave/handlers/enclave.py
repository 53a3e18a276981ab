"""The enclave handler: the container's init never execs the entrypoint; it drives an enclave runtime through
the Enclave Runtime PAL API (a C PAL, or the built-in WebAssembly runtime) and forwards every signal to it as
``pal_kill(-1, sig)``. Everything else (namespaces, cgroups, rootfs, hooks, confinement) is the native
container's, built by the same layers.
"""

from __future__ import annotations

import _signal
import os
import threading

from clave.enclave import config as enclave_config
from clave.enclave.runtime import EnclaveError, EnclaveRuntime
from clave.errors import ClaveError
from clave.handlers.native import NativeHandler, make_plan
from clave.linux import process as proc
from clave.linux import spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from clave.engine.container import CreateOptions
    from clave.engine.state import State, StateDir

# Signals the init forwards to the enclave. Not the ones the kernel or the C runtime keep for themselves
# (KILL, STOP), not synchronous faults, not SIGCHLD (a PAL may wait for its own children).
FORWARDED_SIGNALS = (1, 2, 3, 6, 10, 12, 13, 14, 15, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)


class EnclaveHandler(NativeHandler):
    name = "enclave"

    def prepare(self, state: State) -> None:
        config = state.config
        try:
            settings = enclave_config.extract(config)
            devices = enclave_config.check_host(settings)
            if settings["type"] != "wasm":
                enclave_config.validate_pal_path(settings.get("runtime_path", ""))
        except enclave_config.EnclaveConfigError as exc:
            raise ClaveError(str(exc)) from None
        _inject_devices(config, devices, settings["type"])
        insecure = settings["type"] in enclave_config.SOFTWARE_TYPES
        state.extra["enclave"] = {**settings, "insecure": insecure}

    def spawn(self, state: State, state_dir: StateDir, opts: CreateOptions, cgroup: Any, runtime_hooks: Any) -> int:
        plan = make_plan(state, state_dir, opts, enclave_launch)
        plan.before_pivot = load_enclave_runtime
        plan.handler_state = dict(state.extra["enclave"])
        return self.spawn_plan(plan, opts, cgroup, runtime_hooks)


def _inject_devices(config: dict[str, Any], devices: list[str], enclave_type: str) -> None:
    """Give the container the host's enclave devices (and the SGX aesmd socket), as rune does."""
    linux = config.setdefault("linux", {})
    present = {d.get("path") for d in linux.get("devices", [])}
    for path in devices:
        if path in present:
            continue
        st = os.stat(path)
        linux.setdefault("devices", []).append({
            "path": path, "type": "c", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
            "fileMode": 0o666, "uid": 0, "gid": 0,
        })
    aesmd = os.path.dirname(enclave_config.SGX_AESM_SOCKET)
    if enclave_type == "intelSgx" and os.path.isdir(aesmd):
        config.setdefault("mounts", []).append(
            {"destination": aesmd, "type": "bind", "source": aesmd, "options": ["rbind", "rprivate"]})


def make_runtime(settings: dict[str, Any], device_fd: int = -1) -> EnclaveRuntime:
    if settings["type"] == "wasm":
        from clave.enclave.wasm.runtime import WasmRuntime

        return WasmRuntime()
    from clave.enclave.pal import PalRuntime

    return PalRuntime(settings["runtime_path"], settings["type"], device_fd)


def load_enclave_runtime(plan: spawn.InitPlan) -> None:
    """In the init, before pivot_root: load the enclave runtime while its host path resolves."""
    settings = plan.handler_state
    runtime = make_runtime(settings)
    try:
        runtime.prepare(plan.rootfs, plan.config)
    except EnclaveError as exc:
        raise spawn.SpawnError(str(exc)) from None
    plan.handler_state = (settings, runtime)


def enclave_launch(plan: spawn.InitPlan, ctx: dict[str, Any]) -> None:
    """After start: pal_init, confinement, then the entrypoint through the PAL with signals forwarded."""
    settings, runtime = plan.handler_state
    process = dict(plan.process)
    if plan.linux.get("seccomp"):
        process["_seccomp"] = plan.linux["seccomp"]
    env = proc.environment(process, plan.extra_env)
    runtime.init(settings["runtime_args"], settings["log_level"])
    proc.finalize(process, in_userns="user" in plan.namespaces)
    proc.mark_fds_cloexec(2 + plan.keep_fds)
    args = process["args"]
    pid = runtime.create_process(args[0], args, [f"{k}={v}" for k, v in env.items()], (0, 1, 2))
    os.write(ctx["exec_fifo"], b"0")
    os.close(ctx["exec_fifo"])
    os._exit(run_forwarding_signals(runtime, pid))


def run_forwarding_signals(runtime: EnclaveRuntime, pid: int) -> int:
    """Run the enclave process in a worker thread; the main thread forwards signals as pal_kill(-1, sig)
    (Python runs signal handlers only in the main thread, and only between bytecodes)."""
    result: dict[str, Any] = {}

    def worker() -> None:
        try:
            result["code"] = runtime.exec(pid)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    def forward(sig: int, _frame: object) -> None:
        try:
            runtime.kill(-1, sig)
        except EnclaveError:
            # No pal_kill (a v1 PAL): a terminating signal ends the container as it would a process.
            if sig not in (18, 20, 21, 22, 23, 28):
                os._exit(128 + sig)

    for sig in FORWARDED_SIGNALS:
        _signal.signal(sig, forward)
    thread = threading.Thread(target=worker, name="enclave-exec", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
    try:
        runtime.destroy()
    except EnclaveError as exc:
        os.write(2, f"clave: {exc}\n".encode())
    if "error" in result:
        os.write(2, f"clave: enclave: {result['error']}\n".encode())
        return 1
    code: int = result.get("code", 1)
    return code & 0xFF if code >= 0 else 128 + (-code & 0x7F)
