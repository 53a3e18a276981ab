"""The enclave handler: the container's init never execs the entrypoint; it drives an enclave runtime through
the Enclave Runtime PAL API (a C PAL, or the built-in WebAssembly runtime) and forwards every signal to it as
``pal_kill(-1, sig)``. Before the entrypoint runs, the runtime provisions the app (attestation files, secrets
from a key broker: ``clave.enclave.provision``); while it runs, the init's agent socket serves `clave exec`,
`clave attest ID` and `clave attest ID --kbs`. Everything else (namespaces, cgroups, rootfs, hooks, confinement)
is the native container's, built by the same layers.
"""

from __future__ import annotations

# Everything the init uses after pivot_root is imported here, before it forks: the package is out of reach then.
# Raw _socket: the socket module's enum import would cost every enclave start ~10 ms; binascii, not base64
# (which imports re).
import _signal
import _socket as socket
import array
import binascii
import os
import select
import threading

from clave import fastjson
from clave.enclave import config as enclave_config
from clave.enclave import provision
from clave.enclave.runtime import EnclaveError, EnclaveRuntime
from clave.errors import ClaveError, InvalidArgument, Unsupported
from clave.handlers.linux import Launcher, LinuxHandler
from clave.linux import process as proc
from clave.linux import spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from clave.engine.state import State, StateDir
    from clave.handlers.base import ExecOptions

# Signals the init forwards to the enclave. Not the ones the kernel or the C runtime keep for themselves
# (KILL, STOP), not synchronous faults, not SIGCHLD (a PAL may wait for its own children).
FORWARDED_SIGNALS = (1, 2, 3, 6, 10, 12, 13, 14, 15, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)
# The init listens here for `clave exec`: a new process in the same enclave runtime instance (PAL v2+).
AGENT_SOCKET = "enclave.sock"


class EnclaveLauncher(Launcher):
    """The init loads the enclave runtime before pivot_root and, after start, runs the entrypoint through it."""

    def configure(self, plan: spawn.InitPlan, state: State) -> None:
        plan.launch = enclave_launch
        plan.before_pivot = load_enclave_runtime
        plan.handler_state = dict(state.handler_state["enclave"])


class EnclaveHandler(LinuxHandler):
    name = "enclave"
    launcher = EnclaveLauncher()

    def prepare(self, state: State, notice: Callable[[str], None]) -> None:
        super().prepare(state, notice)
        config = state.config
        try:
            settings = enclave_config.extract(config)
            devices = enclave_config.check_host(settings)
            if settings["type"] != "wasm":
                enclave_config.validate_pal_path(settings.get("runtime_path", ""))
            provision.Provisioning(settings)  # its settings are checked now, not in the init
        except (enclave_config.EnclaveConfigError, EnclaveError) as exc:
            raise InvalidArgument(str(exc)) from None
        if settings["type"] == "wasm":
            from clave.enclave.wasm import runtime as wasm_runtime

            _compile_language_runtime(config, notice)
            wasm_runtime.preload()  # before the init is forked: a shim pays it once for all its containers
        _inject_devices(config, devices, settings["type"])
        insecure = settings["type"] in enclave_config.SOFTWARE_TYPES
        state.handler_state["enclave"] = {**settings, "insecure": insecure}
        if insecure:
            notice(f"container {state.id}: enclave type {settings['type']} is INSECURE: no hardware TEE "
                   "protects it (software isolation only)")

    def exec(self, state: State, sd: StateDir, process: dict[str, Any], opts: ExecOptions) -> int:
        """A new process in the same enclave (PAL v2+), stood for on the host by a proxy process."""
        if process.get("terminal"):
            raise Unsupported("exec with a terminal into an enclave container is not supported")
        env = [f"{k}={v}" for k, v in proc.environment(process).items()]
        return exec_in_enclave(sd.path, process, env, opts.stdio)

    def request(self, state: State, sd: StateDir, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        return agent_request(sd.path, request, timeout)

    def describe(self, state: State) -> dict[str, Any]:
        """Clave's addition to `clave state`: what isolates the container, and whether hardware protects it."""
        enclave = state.handler_state.get("enclave", {})
        return {"enclave": {"type": enclave.get("type"), "insecure": enclave.get("insecure")}}


def _compile_language_runtime(config: dict[str, Any], notice: Callable[[str], None]) -> None:
    """An app run by a language runtime: compile that runtime now, on the host's cores and memory, so that the
    init (single-threaded, in the container's cgroup) only loads it."""
    from clave.enclave.wasm import cache, compiler, interpreters

    args = config["process"].get("args") or [""]
    language = interpreters.for_command(args[0])
    if language is None:
        return
    try:
        compiler.ensure_compiled(language.module_path(), announce=notice)
    except (OSError, cache.CacheError) as exc:
        raise ClaveError(f"wasm: the {language.name} runtime: {exc}") from None


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
        provisioning = provision.Provisioning(settings)
        provisioning.before_pivot()
    except EnclaveError as exc:
        raise spawn.SpawnError(str(exc)) from None
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.bind(os.path.join(plan.state_dir, AGENT_SOCKET))  # before pivot_root, where the path resolves
    agent.listen(16)
    plan.handler_state = (settings, runtime, agent, provisioning)


def enclave_launch(plan: spawn.InitPlan, ctx: dict[str, Any]) -> None:
    """After start: pal_init, confinement, then the entrypoint through the PAL with signals forwarded."""
    settings, runtime, agent, provisioning = plan.handler_state
    process = dict(plan.process)
    if plan.linux.get("seccomp"):
        process["_seccomp"] = plan.linux["seccomp"]
    env = proc.environment(process, plan.extra_env)
    runtime.init(settings["runtime_args"], settings["log_level"])
    user = process.get("user", {})
    provisioning.run(runtime, user.get("uid", 0), user.get("gid", 0))  # before the app; as root, unconfined
    proc.finalize(process, in_userns="user" in plan.namespaces)
    proc.mark_fds_cloexec(2 + plan.keep_fds)
    args = process["args"]
    pid = runtime.create_process(_entrypoint(args[0], env), args, [f"{k}={v}" for k, v in env.items()], (0, 1, 2))
    os.write(ctx["exec_fifo"], b"0")
    os.close(ctx["exec_fifo"])
    os._exit(run_forwarding_signals(runtime, pid, agent, provisioning))


def _entrypoint(name: str, env: dict[str, str]) -> str:
    """A bare command name (``sh``, as Kubernetes often gives it) is looked up in the container's PATH, as for a
    native container; a name not found there is passed as is, for enclave runtimes with a file system of their
    own (a LibOS resolves it itself)."""
    if "/" in name:
        return name
    try:
        return proc.find_executable(name, env, os.getcwd())
    except proc.ProcessError:
        return name


def run_forwarding_signals(runtime: EnclaveRuntime, pid: int, agent: socket.socket | None = None,
                           provisioning: provision.Provisioning | None = None) -> int:
    """Run the enclave process in a worker thread; the main thread forwards signals as pal_kill(-1, sig)
    (Python runs signal handlers only in the main thread, and only between bytecodes) and serves `clave exec`
    requests on the agent socket."""
    result: dict[str, Any] = {}
    done_r, done_w = os.pipe()  # the worker's exit wakes the main thread at once (no polling delay)

    def worker() -> None:
        try:
            result["code"] = runtime.exec(pid)
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc
        finally:
            os.write(done_w, b"x")

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
    waiting = [done_r] if agent is None else [done_r, agent.fileno()]
    while True:
        # Signals interrupt select; their handlers run here in the main thread, then select resumes.
        ready, _, _ = select.select(waiting, [], [])
        if done_r in ready or agent is None:
            break
        fd, _ = agent._accept()  # type: ignore[attr-defined]  # _socket has no accept()
        _serve_agent_request(runtime, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd), provisioning)
    thread.join()
    try:
        runtime.destroy()
    except EnclaveError as exc:
        os.write(2, f"clave: {exc}\n".encode())
    if "error" in result:
        os.write(2, f"clave: enclave: {result['error']}\n".encode())
        return 1
    return _exit_status(result.get("code", 1))


def _exit_status(code: int) -> int:
    return code & 0xFF if code >= 0 else 128 + (-code & 0x7F)


def _send(conn: socket.socket, **message: Any) -> None:
    conn.sendall(fastjson.dumps(message).encode() + b"\n")


def _serve_agent_request(runtime: EnclaveRuntime, conn: socket.socket,
                         provisioning: provision.Provisioning | None = None) -> None:
    """One request: ``exec`` (with the process's stdio as SCM_RIGHTS) or ``kill``. create_process runs here,
    in the main thread; the process itself runs in a thread that reports its exit on the connection."""
    fds: list[int] = []
    try:
        conn.settimeout(5)
        data, fds = _recv_with_fds(conn)
        request = fastjson.loads(data)
        if request.get("op") == "kill":
            runtime.kill(int(request["pid"]), int(request["sig"]))
            _send(conn, ok=True)
            conn.close()
            return
        if request.get("op") == "kbs":
            if provisioning is None:
                raise EnclaveError("this enclave runtime cannot fetch secrets")
            provisioning.fetch_for_agent(runtime, request)
            _send(conn, ok=True)
            conn.close()
            return
        if request.get("op") == "attest":
            evidence = runtime.local_report(b"", bytes.fromhex(request.get("report_data", "")))
            _send(conn, tee=runtime.name, insecure=runtime.insecure, measurement=runtime.measurement(),
                  evidence=binascii.b2a_base64(evidence, newline=False).decode())
            conn.close()
            return
        if runtime.api_version < 2:
            raise EnclaveError("exec needs an enclave runtime with PAL API v2 or later (this one is v1)")
        if len(fds) != 3:
            raise EnclaveError("exec request must carry stdin, stdout and stderr")
        pid = runtime.create_process(request["args"][0], request["args"], request.get("env", []),
                                     (fds[0], fds[1], fds[2]))
        _send(conn, pid=pid)
    except Exception as exc:
        try:
            _send(conn, error=str(exc))
        except OSError:
            pass
        conn.close()
        for fd in fds:
            os.close(fd)
        return

    def run_exec() -> None:
        try:
            message: dict[str, Any] = {"exit": _exit_status(runtime.exec(pid))}
        except Exception as exc:
            message = {"error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            _send(conn, **message)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=run_exec, name=f"enclave-exec-{pid}", daemon=True).start()


def _recv_with_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data.rstrip(b"\n"), list(fds)


# ---------------------------------------------------------------------------------------------------------
# The `clave exec` side: a proxy process stands for the enclave process on the host, so callers (containerd's
# shim, podman) can wait for it, signal it and read its exit status as for any exec'd process.

def exec_in_enclave(state_dir: str, process: dict[str, Any], env: list[str],
                    stdio: tuple[int, int, int] | None = None) -> int:
    """Fork the proxy; returns its pid once the enclave process exists. The proxy exits with the enclave
    process's status and forwards signals to it as pal_kill(pid, sig). ``stdio`` (an in-process caller's
    choice, as the shim's) becomes the enclave process's; by default the caller's own."""
    read_fd, write_fd = os.pipe()
    proxy = os.fork()
    if proxy == 0:
        os.close(read_fd)
        if stdio is not None:
            spawn.adopt_stdio(stdio)
        _run_proxy(os.path.join(state_dir, AGENT_SOCKET), process, env, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()
    if not report.startswith(b"ok"):
        os.waitpid(proxy, 0)
        raise ClaveError(report.decode(errors="replace") or "enclave exec failed")
    return proxy


class _LineReader:
    """readline() over a raw socket (``_socket`` sockets have no makefile)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


def agent_request(state_dir: str, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """One request to a running enclave container's agent (its init), answered with one JSON line: ``attest``
    (evidence from its enclave runtime binding ``report_data``) or ``kbs`` (a secret fetched into it)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(os.path.join(state_dir, AGENT_SOCKET))
        conn.sendall(fastjson.dumps(request).encode() + b"\n")
        reply: dict[str, Any] = fastjson.loads(_LineReader(conn).readline() or b'{"error": "no reply"}')
    except OSError as exc:
        raise ClaveError(f"enclave agent: {exc.strerror or exc}") from None
    finally:
        conn.close()
    if "error" in reply:
        raise ClaveError(f"{request['op']}: {reply['error']}")
    return reply


def _run_proxy(path: str, process: dict[str, Any], env: list[str], report_fd: int) -> None:
    code = 1
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
        except OSError as exc:
            raise EnclaveError(f"enclave agent {path}: {exc.strerror}") from None
        request = fastjson.dumps({"op": "exec", "args": process["args"], "env": env, "cwd": process.get("cwd", "/")})
        conn.sendmsg([request.encode() + b"\n"],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        reader = _LineReader(conn)
        first = fastjson.loads(reader.readline() or b'{"error": "enclave agent closed the connection"}')
        if "error" in first:
            raise EnclaveError(first["error"])
        enclave_pid = int(first["pid"])

        def forward(sig: int, _frame: object) -> None:
            kill_conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                kill_conn.connect(path)
                kill_conn.sendall(fastjson.dumps({"op": "kill", "pid": enclave_pid, "sig": sig}).encode() + b"\n")
                kill_conn.recv(4096)
            except OSError:
                pass
            finally:
                kill_conn.close()

        for sig in FORWARDED_SIGNALS:
            _signal.signal(sig, forward)
        os.write(report_fd, b"ok")
        os.close(report_fd)
        report_fd = -1
        last = fastjson.loads(reader.readline() or b'{"exit": 137}')
        code = int(last.get("exit", 1))
        if "error" in last:
            os.write(2, f"clave: enclave: {last['error']}\n".encode())
    except Exception as exc:
        if report_fd >= 0:
            os.write(report_fd, str(exc).encode())
    finally:
        os._exit(code)
