"""The container engine: lifecycle and state, per runtime-spec runtime.md; handlers do the isolation.

Every verb locks the container's state directory, derives the live status, refuses operations the status
does not allow (with no effect), and on any failure during create undoes everything create did.
"""

from __future__ import annotations

import os
import select
import time

from clave.config import spec as oci
from clave.config.defaults import device_rules
from clave.engine import state as st
from clave.errors import (
    AlreadyExists,
    ClaveError,
    InvalidArgument,
    NotFound,
    Unsupported,
    WrongState,
    os_error_message,
)
from clave.handlers import Handler, handler_for
from clave.linux.hooks import HookError, run_hooks
from clave.linux.signals import SIGKILL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class CreateOptions:
    def __init__(
        self, bundle: str, pid_file: str | None = None, console_socket: str | None = None, no_pivot: bool = False,
        preserve_fds: int = 0, listen_fds: int = 0, detach_check: bool = True,
        stdio: tuple[int, int, int] | None = None,
    ) -> None:
        self.bundle = bundle
        self.stdio = stdio  # the container's stdin/stdout/stderr; None: this process's own (the CLI's way)
        self.pid_file = pid_file
        self.console_socket = console_socket
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
        self.source = source  # where the process came from, for its validation errors (a --process file...)
        self.console_socket = console_socket
        self.pid_file = pid_file
        self.preserve_fds = preserve_fds
        self.ignore_paused = ignore_paused


class Engine:
    def __init__(self, root: str = st.DEFAULT_ROOT, log: Any = None) -> None:
        self.root = root
        self.log = log

    # ---------------------------------------------------------------- helpers
    def _open(self, container_id: str) -> tuple[st.StateDir, st.State]:
        sd = st.StateDir(self.root, container_id)
        if not sd.present():
            raise NotFound(f"container {container_id} does not exist")
        sd.lock()
        try:
            return sd, sd.load()
        except BaseException:
            sd.unlock()
            raise

    def _warn(self, message: str) -> None:
        if self.log is not None:
            self.log.warning(message)

    # ---------------------------------------------------------------- create
    def create(self, container_id: str, opts: CreateOptions) -> st.State:
        bundle = os.path.abspath(opts.bundle)
        sd = st.StateDir(self.root, container_id)  # validates the id
        if sd.present():
            raise AlreadyExists(f"container {container_id} already exists")
        try:
            config = oci.load_bundle(bundle)
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        if "process" not in config:
            raise InvalidArgument("config.json: process: required to create a container")
        handler = handler_for(config)
        terminal = bool(config["process"].get("terminal"))
        if terminal and not opts.console_socket and opts.detach_check:
            raise InvalidArgument("cannot allocate tty if clave will detach without setting console socket")
        if not terminal and opts.console_socket:
            raise InvalidArgument("cannot use console socket if clave will not detach or allocate tty")
        state = st.State(
            id=container_id,
            bundle=bundle,
            rootfs=oci.rootfs_path(config, bundle),
            annotations=config.get("annotations", {}),
            config=config,
            handler=handler.name,
        )
        sd.make()
        cgroup = None
        try:
            sd.lock()
            handler.prepare(state, self._warn)
            enclave = state.extra.get("enclave")
            if enclave and enclave["insecure"]:
                self._warn(f"container {container_id}: enclave type {enclave['type']} is INSECURE: no hardware "
                           "TEE protects it (software isolation only)")
            os.mkfifo(sd.fifo, 0o622)
            os.chown(sd.fifo, *_host_root_ids(config))  # the init opens it as the container's root
            cgroup = self._cgroup_for(state)
            sd.save(state)  # pid 0 = "creating": from here on, delete --force cleans up after a crash
            _pause_point("after-state-dir")
            self._apply_cgroup(state, cgroup)
            _pause_point("after-cgroup")
            pid = handler.spawn(state, sd, opts, cgroup, lambda init_pid: self._runtime_hooks(state, sd, init_pid))
            state.pid = pid
            stat = st.proc_stat(pid)
            state.pid_start = stat[1] if stat else 0
            sd.save(state)
            _pause_point("before-pid-file")
            if opts.pid_file:
                _write_pid_file(opts.pid_file, pid)
            return state
        except BaseException as exc:
            self._destroy(state, sd, cgroup)
            if isinstance(exc, OSError):
                raise ClaveError(os_error_message(exc)) from None
            raise  # a ClaveError, or a bug: the CLI reports it as an internal error
        finally:
            sd.unlock()

    def _cgroup_for(self, state: st.State) -> Any:
        """The container's cgroup manager; its paths are known (and recorded) before anything is made."""
        from clave.linux import cgroups

        try:
            cgroup = cgroups.cgroup_manager(state.config.get("linux", {}).get("cgroupsPath"), state.id)
        except cgroups.CgroupError as exc:
            raise ClaveError(f"cgroup: {exc}") from None
        state.cgroup_paths = cgroup.paths()
        return cgroup

    def _apply_cgroup(self, state: st.State, cgroup: Any) -> None:
        from clave.linux import cgroups

        linux = state.config.get("linux", {})
        try:
            cgroup.create()
            resources = dict(linux.get("resources", {}))
            resources["devices"] = device_rules(linux)
            cgroup.set(resources, self._warn)
        except cgroups.CgroupError as exc:
            raise ClaveError(f"cgroup: {exc}") from None

    def _runtime_hooks(self, state: st.State, sd: st.StateDir, init_pid: int) -> None:
        hooks = state.config.get("hooks", {})
        doc = self._hook_state(state, "creating", init_pid)
        for kind in ("prestart", "createRuntime"):
            try:
                run_hooks(kind, hooks.get(kind, []), doc)
            except HookError as exc:
                raise ClaveError(f"error running {exc}") from None

    def _hook_state(self, state: st.State, status: str, pid: int) -> dict[str, Any]:
        # runtime.md's state: ociVersion is the spec version the state complies with (the runtime's, as in
        # `clave state` and runc's hooks), not the config's.
        doc: dict[str, Any] = {
            "ociVersion": st.OCI_VERSION, "id": state.id,
            "status": status, "pid": pid, "bundle": state.bundle,
        }
        if state.annotations:
            doc["annotations"] = state.annotations
        return doc

    # ---------------------------------------------------------------- start
    def start(self, container_id: str) -> None:
        sd, state = self._open(container_id)
        try:
            status = st.status(state, sd)
            if status != "created":
                raise WrongState(f"cannot start a container in the {status} state (it must be created)")
            error = _release_init(sd.fifo, state)
            os.unlink(sd.fifo)
            if error is not None:
                self._stop_after_failed_start(state, sd)
                raise ClaveError(error)
            hooks = state.config.get("hooks", {}).get("poststart", [])
            if hooks:  # runtime.md: a failing poststart hook is a warning; the rest run
                run_hooks("poststart", hooks, self._hook_state(state, "running", state.pid), self._warn)
        finally:
            sd.unlock()

    def _stop_after_failed_start(self, state: st.State, sd: st.StateDir) -> None:
        try:
            os.kill(state.pid, SIGKILL)
        except ProcessLookupError:
            pass

    # ---------------------------------------------------------------- state / list
    def state(self, container_id: str) -> dict[str, Any]:
        sd = st.StateDir(self.root, container_id)
        return st.oci_state(sd.load(), sd)

    def list_states(self) -> list[dict[str, Any]]:
        out = []
        for cid in st.list_ids(self.root):
            sd = st.StateDir(self.root, cid)
            try:
                doc = st.oci_state(sd.load(), sd)
                doc["owner"] = st.owner_name(sd.path)  # runc: `list` names the owner, `state` leaves it empty
            except (ClaveError, OSError):
                continue  # deleted meanwhile, or half-written by a create in progress
            out.append(doc)
        return out

    # ---------------------------------------------------------------- kill
    def kill(self, container_id: str, sig: int, all_processes: bool = False) -> None:
        sd, state = self._open(container_id)
        try:
            status = st.status(state, sd)
            if status not in ("created", "running", "paused"):
                # containerd matches "container not running" to treat the kill as already done.
                raise WrongState(f"container not running: {container_id} is {status}")
            if all_processes:
                self._cgroup(state).kill_all(sig)
                return
            try:
                os.kill(state.pid, sig)
            except ProcessLookupError:
                raise WrongState(f"container not running: {container_id}") from None
        finally:
            sd.unlock()

    def _cgroup(self, state: st.State) -> Any:
        from clave.linux import cgroups

        return cgroups.CgroupManager.from_paths(state.cgroup_paths)

    # ---------------------------------------------------------------- delete
    def delete(self, container_id: str, force: bool = False) -> None:
        sd = st.StateDir(self.root, container_id)
        if not sd.present():
            raise NotFound(f"container {container_id} does not exist")
        sd.lock()
        try:
            try:
                state = sd.load()
            except ClaveError:
                if not force:
                    raise
                sd.remove()  # half-written by a crashed create: nothing else is known
                return
            status = st.status(state, sd)
            if status in ("running", "paused", "creating") and not force:
                raise WrongState(f"cannot delete container {container_id} that is not stopped: {status}")
            self._destroy(state, sd, None)
            hooks = state.config.get("hooks", {}).get("poststop", [])
            if hooks and status != "creating":  # as poststart: failures are warnings, the rest run
                run_hooks("poststop", hooks, self._hook_state(state, "stopped", 0), self._warn)
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- exec
    def exec(self, container_id: str, process: dict[str, Any], opts: ExecOptions) -> int:
        """Start ``process`` in the running container; returns its pid once it has exec'd."""
        from clave.linux import enter, spawn

        try:
            oci.validate_process(process, opts.source)
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        sd, state = self._open(container_id)
        try:
            status = st.status(state, sd)
            if status == "paused" and not opts.ignore_paused:
                raise WrongState(f"container {container_id} is paused; resume it first (or --ignore-paused)")
            if status not in ("created", "running", "paused"):
                raise WrongState(f"cannot exec in a {status} container")
            if state.handler == "enclave":
                if process.get("terminal"):
                    raise Unsupported("exec with a terminal into an enclave container is not supported")
                from clave.handlers.enclave import exec_in_enclave
                from clave.linux.process import environment

                env = [f"{k}={v}" for k, v in environment(process).items()]
                pid = exec_in_enclave(sd.path, process, env)
                if opts.pid_file:
                    _write_pid_file(opts.pid_file, pid)
                return pid
            linux = state.config.get("linux", {})
            try:
                spawn.check_lsm(process, {})
            except spawn.SpawnError as exc:
                raise ClaveError(str(exc)) from None
            process = dict(process)
            if linux.get("seccomp"):
                process["_seccomp"] = linux["seccomp"]
            types = [n["type"] for n in linux.get("namespaces", [])]
            cgroup = self._cgroup(state)
            console_fd = None
            if process.get("terminal"):
                from clave.linux import console

                if not opts.console_socket:
                    raise InvalidArgument("cannot allocate tty if clave will detach without setting console socket")
                console_fd = console.connect_socket(opts.console_socket)
            try:
                pid = enter.enter(state.pid, types, process, cgroup.add_process, console_fd, opts.preserve_fds,
                                  stdio=opts.stdio)
            except enter.EnterError as exc:
                raise ClaveError(str(exc)) from None
            except OSError as exc:
                raise ClaveError(os_error_message(exc)) from None
            finally:
                if console_fd is not None:
                    os.close(console_fd)
            if opts.pid_file:
                _write_pid_file(opts.pid_file, pid)
            return pid
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- attest
    def attest(self, container_id: str, report_data: bytes) -> dict[str, Any]:
        """Evidence from a running enclave container's own enclave runtime, binding ``report_data``."""
        return self._enclave_request(container_id, {"op": "attest", "report_data": report_data.hex()})

    def fetch_secret(self, container_id: str, url: str, resource: str, path: str, ca_pem: str | None = None) -> None:
        """A running enclave container's runtime attests to the KBS at ``url`` and writes ``resource`` to
        ``path`` inside the container (a tmpfs)."""
        self._enclave_request(container_id, {"op": "kbs", "url": url, "resource": resource, "path": path,
                                             "ca": ca_pem}, timeout=60)

    def _enclave_request(self, container_id: str, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        sd, state = self._open(container_id)
        try:
            if state.handler != "enclave":
                raise Unsupported(f"container {container_id} is not an enclave container: nothing to attest")
            if st.status(state, sd) not in ("running", "paused"):
                raise WrongState(f"container {container_id} is not running")
            from clave.handlers.enclave import agent_request

            return agent_request(sd.path, request, timeout)
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- ps / pause / resume / update / stats
    def pids(self, container_id: str) -> list[int]:
        sd, state = self._open(container_id)
        try:
            if st.status(state, sd) == "stopped":
                return []
            return sorted(self._cgroup(state).pids())
        finally:
            sd.unlock()

    def pause(self, container_id: str) -> None:
        sd, state = self._open(container_id)
        try:
            status = st.status(state, sd)
            if status not in ("running", "created"):  # runc freezes a created container too
                raise WrongState(f"container {container_id} is not running (status {status})")
            self._cgroup(state).freeze()
        finally:
            sd.unlock()

    def resume(self, container_id: str) -> None:
        sd, state = self._open(container_id)
        try:
            status = st.status(state, sd)
            if status != "paused":
                raise WrongState(f"container {container_id} is not paused (status {status})")
            self._cgroup(state).thaw()
        finally:
            sd.unlock()

    def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply new cgroup resources to a live container and record them."""
        from clave.linux import cgroups

        try:
            oci.validate_resources(resources, "update")
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        sd, state = self._open(container_id)
        try:
            status = st.status(state, sd)
            if status == "stopped":
                raise WrongState(f"cannot update a stopped container {container_id}")
            try:
                self._cgroup(state).set(resources, self._warn)
            except cgroups.CgroupError as exc:
                raise ClaveError(f"cgroup: {exc}") from None
            merged = state.config.setdefault("linux", {}).setdefault("resources", {})
            for key, value in resources.items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
            sd.save(state)
        finally:
            sd.unlock()

    def stats(self, container_id: str) -> dict[str, Any]:
        """runc's ``events --stats`` data: cgroup statistics plus the network interfaces of the container."""
        sd, state = self._open(container_id)
        try:
            if st.status(state, sd) == "stopped":
                raise WrongState(f"container {container_id} is not running")
            data: dict[str, Any] = self._cgroup(state).stats()
            data["network_interfaces"] = _network_interfaces(state.pid)
            return data
        finally:
            sd.unlock()

    def oom_kills(self, container_id: str) -> int:
        sd, state = self._open(container_id)
        try:
            count: int = self._cgroup(state).oom_kill_count()
            return count
        finally:
            sd.unlock()

    def _destroy(self, state: st.State, sd: st.StateDir, cgroup: Any) -> None:
        """Undo create: stop every process, remove the cgroup, the handler's leftovers and the state dir."""
        if state.pid > 0 and st.init_alive(state):
            try:
                os.kill(state.pid, SIGKILL)
            except ProcessLookupError:
                pass
        if cgroup is None and state.cgroup_paths:
            cgroup = self._cgroup(state)
        if cgroup is not None:
            try:
                cgroup.kill_all(SIGKILL)
                _wait_gone(lambda: bool(cgroup.pids()))
                cgroup.destroy()
            except Exception as exc:  # keep cleaning; report what stayed
                self._warn(f"cgroup cleanup: {exc}")
        try:
            handler_for(state.config, name=state.handler).cleanup(state)
        except Exception as exc:
            self._warn(f"{state.handler} handler cleanup: {exc}")
        sd.remove()


def _pause_point(step: str) -> None:
    """Fault-injection tests only: stop here (SIGSTOP) when CLAVE_TEST_PAUSE_AT names this step of create."""
    if os.environ.get("CLAVE_TEST_PAUSE_AT") == step:
        os.kill(os.getpid(), 19)  # SIGSTOP: the test then kills clave with SIGKILL


def _wait_gone(busy: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while busy() and time.monotonic() < deadline:
        time.sleep(0.005)


def _network_interfaces(pid: int) -> list[dict[str, Any]]:
    """Counters of every interface in the container's network namespace, seen through its init's /proc."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return []
    out = []
    for line in lines:
        name, _, counters = line.partition(":")
        v = [int(x) for x in counters.split()]
        if len(v) < 12:
            continue
        out.append({
            "name": name.strip(),
            "rx_bytes": v[0], "rx_packets": v[1], "rx_errors": v[2], "rx_dropped": v[3],
            "tx_bytes": v[8], "tx_packets": v[9], "tx_errors": v[10], "tx_dropped": v[11],
        })
    return out


def _host_root_ids(config: dict[str, Any]) -> tuple[int, int]:
    """The host uid and gid the container's root maps to (0, 0 without a user namespace)."""
    linux = config.get("linux", {})
    maps = {"uidMappings": linux.get("uidMappings", []), "gidMappings": linux.get("gidMappings", [])}
    joined = oci.namespaces(config).get("user")
    if joined and not (maps["uidMappings"] and maps["gidMappings"]):
        from clave.linux import namespaces as ns

        try:
            maps["uidMappings"], maps["gidMappings"] = ns.id_maps_of(joined)
        except ns.NamespaceError as exc:
            raise ClaveError(str(exc)) from None
    ids = []
    for key in ("uidMappings", "gidMappings"):
        host = 0
        for m in maps[key]:
            if m["containerID"] <= 0 < m["containerID"] + m["size"]:
                host = m["hostID"] - m["containerID"]
                break
        ids.append(host)
    return ids[0], ids[1]


def _write_pid_file(path: str, pid: int) -> None:
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.rename(tmp, path)
    except OSError as exc:
        raise ClaveError(f"write pid file {path}: {exc.strerror}") from None


def _release_init(fifo: str, state: st.State) -> str | None:
    """Open the exec fifo so the waiting init proceeds; returns its error message, or None once it exec'd."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        data = b""
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        # Until the init opens its end, poll reports nothing; check it is still alive meanwhile.
        while True:
            events = poller.poll(50)
            if events:
                break
            if not st.init_alive(state):
                return "container init exited before start"
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                select.select([fd], [], [], 1.0)
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if data.startswith(b"0X"):  # the exec trampoline's execve failed (clave.linux.trampoline)
        from clave.linux import trampoline

        failed = trampoline.failure(data[1:])
        args = state.config.get("process", {}).get("args", ["?"])
        return f'exec: "{args[0]}": {os.strerror(failed or 0)}'
    if data.startswith(b"0") and b"E" not in data[:2]:
        return None
    message = data.lstrip(b"0")[1:].decode(errors="replace") if data else "container init exited before start"
    return message or "container init failed"


__all__ = ["CreateOptions", "Engine", "ExecOptions", "Handler"]
