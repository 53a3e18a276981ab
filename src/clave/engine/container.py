"""The container engine: lifecycle and state, per runtime-spec runtime.md; handlers do everything else.

What the engine keeps is what every handler shares: id validation, the state directory and its lock, status
gating (an operation the status does not allow fails with no effect), hooks, and undoing a failed create.
Every other step goes through the handler contract (clave.handlers.base), whichever handler it is.
"""

from __future__ import annotations

import os

from clave.engine import state as st
from clave.errors import AlreadyExists, ClaveError, InvalidArgument, NotFound, Unsupported, WrongState, os_error_message
from clave.faults import pause_point
from clave.handlers import Handler, handler_for
from clave.handlers.base import CreateOptions, ExecOptions

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Engine:
    def __init__(self, root: str = st.DEFAULT_ROOT, log: Any = None, handler: str | None = None) -> None:
        self.root = root
        self.log = log
        self.default_handler = handler  # --handler / a shim's runtime options; annotations may still choose

    # ---------------------------------------------------------------- helpers
    def _open(self, container_id: str) -> tuple[st.StateDir, st.State, Handler]:
        sd = st.StateDir(self.root, container_id)
        if not sd.present():
            raise NotFound(f"container {container_id} does not exist")
        sd.lock()
        try:
            state = sd.load()
            handler = handler_for(state.config, name=state.handler)
            handler.log = self.log
            return sd, state, handler
        except BaseException:
            sd.unlock()
            raise

    def _warn(self, message: str) -> None:
        if self.log is not None:
            self.log.warning(message)

    # ---------------------------------------------------------------- create
    def load_config(self, bundle: str) -> dict[str, Any]:
        """The bundle's validated config.json (a caller that needs its handler first passes it to create)."""
        from clave.config import spec as oci

        try:
            return oci.load_bundle(os.path.abspath(bundle))
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None

    def validated(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` once validated as load_config validates a bundle's (for a caller that has it in memory)."""
        from clave.config import spec as oci

        try:
            oci.validate(config)
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        return config

    def handler_for_config(self, config: dict[str, Any], default: str | None = None) -> Handler:
        """The handler a container of this config gets (the shim attaches its rootfs before create)."""
        return handler_for(config, default=default or self.default_handler)

    def create(self, container_id: str, opts: CreateOptions, config: dict[str, Any] | None = None,
               handler_name: str | None = None) -> st.State:
        """``handler_name``: this container's default handler when its config names none (a runtime's options)."""
        bundle = os.path.abspath(opts.bundle)
        sd = st.StateDir(self.root, container_id)  # validates the id
        if sd.present():
            raise AlreadyExists(f"container {container_id} already exists")
        config = config if config is not None else self.load_config(bundle)
        if "process" not in config:
            raise InvalidArgument("config.json: process: required to create a container")
        handler = self.handler_for_config(config, handler_name)
        handler.log = self.log
        terminal = bool(config["process"].get("terminal"))
        if terminal and not opts.console_socket and opts.detach_check:
            raise InvalidArgument("cannot allocate tty if clave will detach without setting console socket")
        if not terminal and opts.console_socket:
            raise InvalidArgument("cannot use console socket if clave will not detach or allocate tty")
        from clave.config import spec as oci

        state = st.State(id=container_id, bundle=bundle, rootfs=oci.rootfs_path(config, bundle),
                         annotations=config.get("annotations", {}), config=config, handler=handler.name)
        sd.make()
        try:
            sd.lock()
            handler.prepare(state, self._warn)
            pid = handler.create(state, sd, opts, lambda init_pid: self._runtime_hooks(state, init_pid), self._warn)
            state.pid = pid
            sd.save(state)
            pause_point("before-pid-file")
            if opts.pid_file:
                _write_pid_file(opts.pid_file, pid)
            return state
        except BaseException as exc:
            self._destroy(handler, state, sd)
            if isinstance(exc, OSError):
                raise ClaveError(os_error_message(exc)) from None
            raise  # a ClaveError, or a bug: the CLI reports it as an internal error
        finally:
            sd.unlock()

    def _runtime_hooks(self, state: st.State, init_pid: int) -> None:
        from clave.linux.hooks import HookError, run_hooks

        hooks = state.config.get("hooks", {})
        doc = self._hook_state(state, "creating", init_pid)
        for kind in ("prestart", "createRuntime"):
            try:
                run_hooks(kind, hooks.get(kind, []), doc)
            except HookError as exc:
                raise ClaveError(f"error running {exc}") from None

    def _hook_state(self, state: st.State, status: str, pid: int) -> dict[str, Any]:
        doc: dict[str, Any] = {"ociVersion": st.OCI_VERSION, "id": state.id, "status": status, "pid": pid,
                               "bundle": state.bundle}
        if state.annotations:
            doc["annotations"] = state.annotations
        return doc

    def _destroy(self, handler: Handler, state: st.State, sd: st.StateDir) -> None:
        """Undo create: the handler removes what it made; then the state dir goes."""
        try:
            handler.destroy(state, sd, self._warn)
        except Exception as exc:  # keep cleaning; report what stayed
            self._warn(f"{state.handler} handler cleanup: {exc}")
        sd.remove()

    # ---------------------------------------------------------------- start
    def start(self, container_id: str) -> None:
        sd, state, handler = self._open(container_id)
        try:
            status = handler.status(state, sd)
            if status != "created":
                raise WrongState(f"cannot start a container in the {status} state (it must be created)")
            handler.start(state, sd)
            hooks = state.config.get("hooks", {}).get("poststart", [])
            if hooks:
                from clave.linux.hooks import run_hooks

                run_hooks("poststart", hooks, self._hook_state(state, "running", state.pid), warn=self._warn)
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- state / list
    def state(self, container_id: str) -> dict[str, Any]:
        sd = st.StateDir(self.root, container_id)
        state = sd.load()
        handler = handler_for(state.config, name=state.handler)
        return st.oci_state(state, handler.status(state, sd), handler.describe(state))

    def list_states(self) -> list[dict[str, Any]]:
        out = []
        for cid in st.list_ids(self.root):
            try:
                doc = self.state(cid)
                doc["owner"] = st.owner_name(os.path.join(self.root, cid))  # runc: `list` names the owner
            except (ClaveError, OSError):
                continue  # deleted meanwhile, or half-written by a create in progress
            out.append(doc)
        return out

    # ---------------------------------------------------------------- kill / wait
    def kill(self, container_id: str, sig: int, all_processes: bool = False) -> None:
        sd, state, handler = self._open(container_id)
        try:
            status = handler.status(state, sd)
            if status not in ("created", "running", "paused"):
                # containerd matches "container not running" to treat the kill as already done.
                raise WrongState(f"container not running: {container_id} is {status}")
            handler.kill(state, sig, all_processes)
        finally:
            sd.unlock()

    def wait(self, container_id: str, pid: int = 0) -> int:
        """Block until the container's init (or process ``pid``) ends; its status, shell-style."""
        sd = st.StateDir(self.root, container_id)
        state = sd.load()
        return handler_for(state.config, name=state.handler).wait(state, pid or state.pid)

    def signal_process(self, container_id: str, pid: int, sig: int) -> None:
        """Signal one (exec'd) process of the container."""
        sd, state, handler = self._open(container_id)
        try:
            handler.signal_process(state, pid, sig)
        finally:
            sd.unlock()

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
            handler = handler_for(state.config, name=state.handler)
            status = handler.status(state, sd)
            if status in ("running", "paused", "creating") and not force:
                raise WrongState(f"cannot delete container {container_id} that is not stopped: {status}")
            self._destroy(handler, state, sd)
            hooks = state.config.get("hooks", {}).get("poststop", [])
            if hooks and status != "creating":
                from clave.linux.hooks import run_hooks

                run_hooks("poststop", hooks, self._hook_state(state, "stopped", 0), warn=self._warn)
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- exec
    def exec(self, container_id: str, process: dict[str, Any], opts: ExecOptions) -> int:
        """Start ``process`` in the running container; returns its pid once it runs."""
        from clave.config import spec as oci

        try:
            oci.validate_process(process, opts.source)
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        sd, state, handler = self._open(container_id)
        try:
            status = handler.status(state, sd)
            if status == "paused" and not opts.ignore_paused:
                raise WrongState(f"container {container_id} is paused; resume it first (or --ignore-paused)")
            if status not in ("created", "running", "paused"):
                raise WrongState(f"cannot exec in a {status} container")
            pid = handler.exec(state, sd, process, opts)
            if opts.pid_file:
                _write_pid_file(opts.pid_file, pid)
            return pid
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- requests to the container's runtime
    def attest(self, container_id: str, report_data: bytes, nonce: bytes | None = None) -> dict[str, Any]:
        """Evidence from the container's own runtime, binding ``report_data`` (handlers that have none refuse);
        evidence that carries a nonce of its own (a TPM quote's qualifying data) binds ``nonce`` when given."""
        request = {"op": "attest", "report_data": report_data.hex()}
        if nonce is not None:
            request["nonce"] = nonce.hex()
        return self._request(container_id, request)

    def fetch_secret(self, container_id: str, url: str, resource: str, path: str, ca_pem: str | None = None) -> None:
        """The container's runtime attests to the KBS at ``url`` and writes ``resource`` to ``path`` inside it."""
        self._request(container_id, {"op": "kbs", "url": url, "resource": resource, "path": path, "ca": ca_pem},
                      timeout=60)

    def _request(self, container_id: str, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        sd, state, handler = self._open(container_id)
        try:
            if handler.status(state, sd) not in ("running", "paused"):
                raise WrongState(f"container {container_id} is not running")
            from clave.engine import counters  # counted where it happens, for the shim's metrics

            try:
                reply = handler.request(state, sd, request, timeout)
            except Unsupported:
                raise  # no runtime to ask: nothing was requested
            except ClaveError as exc:
                counters.record(sd.path, counters.outcome(request["op"], exc))
                raise
            counters.record(sd.path, counters.outcome(request["op"], None))
            return reply
        finally:
            sd.unlock()

    # ---------------------------------------------------------------- ps / pause / resume / update / stats
    def pids(self, container_id: str) -> list[int]:
        sd, state, handler = self._open(container_id)
        try:
            if handler.status(state, sd) == "stopped":
                return []
            return handler.pids(state)
        finally:
            sd.unlock()

    def pause(self, container_id: str) -> None:
        sd, state, handler = self._open(container_id)
        try:
            status = handler.status(state, sd)
            if status not in ("running", "created"):  # runc freezes a created container too
                raise WrongState(f"container {container_id} is not running (status {status})")
            handler.pause(state)
            sd.save(state)  # what the handler recorded (a vm container's paused mark)
        finally:
            sd.unlock()

    def resume(self, container_id: str) -> None:
        sd, state, handler = self._open(container_id)
        try:
            status = handler.status(state, sd)
            if status != "paused":
                raise WrongState(f"container {container_id} is not paused (status {status})")
            handler.resume(state)
            sd.save(state)
        finally:
            sd.unlock()

    def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply new resources to a live container and record them."""
        from clave.config import spec as oci

        try:
            oci.validate_resources(resources, "update")
        except oci.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        sd, state, handler = self._open(container_id)
        try:
            if handler.status(state, sd) == "stopped":
                raise WrongState(f"cannot update a stopped container {container_id}")
            handler.update(state, resources, self._warn)
            merged = state.config.setdefault("linux", {}).setdefault("resources", {})
            for key, value in resources.items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
            sd.save(state)
        finally:
            sd.unlock()

    def stats(self, container_id: str) -> dict[str, Any]:
        """runc's ``events --stats`` data, as the handler measures it."""
        sd, state, handler = self._open(container_id)
        try:
            if handler.status(state, sd) == "stopped":
                raise WrongState(f"container {container_id} is not running")
            return handler.stats(state)
        finally:
            sd.unlock()

    def oom_kills(self, container_id: str) -> int:
        sd, state, handler = self._open(container_id)
        try:
            return handler.oom_count(state)
        finally:
            sd.unlock()

    def handler(self, container_id: str) -> Handler:
        """The handler of an existing container (the shim asks it for its sandbox and rootfs)."""
        state = st.StateDir(self.root, container_id).load()
        return handler_for(state.config, name=state.handler)


def _write_pid_file(path: str, pid: int) -> None:
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.rename(tmp, path)
    except OSError as exc:
        raise ClaveError(f"write pid file {path}: {exc.strerror}") from None


__all__ = ["CreateOptions", "Engine", "ExecOptions", "Handler"]
