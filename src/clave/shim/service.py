"""The ``containerd.task.v2.Task`` service over the Clave engine, called in-process (no runtime binary per call).

One shim serves every container of a pod. Each container has an init process and any number of exec'd
processes. Everything a container needs goes through the handler contract (clave.handlers.base): its rootfs,
its processes, and their exits, which come from the pod's Sandbox (for Linux containers a reaper, the shim
being their subreaper; for a VM its guest agent). Errors map by class to ttrpc status codes.
"""

from __future__ import annotations

import os
import threading

from clave import fastjson
from clave.config import spec as oci
from clave.engine.container import CreateOptions, Engine, ExecOptions
from clave.errors import ClaveError, InvalidArgument, NotFound, Unsupported, WrongState
from clave.handlers.base import Exit, Sandbox
from clave.proto.generated import containerd_events as ev
from clave.proto.generated import containerd_task_v2 as task
from clave.proto.generated import containerd_v1_types as types
from clave.proto.generated.google_protobuf import Any as AnyMessage
from clave.proto.generated.google_protobuf import Empty, Timestamp
from clave.shim.io import ProcessIO
from clave.shim.main import STATE_ROOT
from clave.ttrpc import Code, TtrpcError, from_clave_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from clave.shim.events import Publisher
    from clave.ttrpc import Context

VERSION = "2"


class Process:
    """An init or exec'd process as the shim tracks it."""

    def __init__(self, container_id: str, exec_id: str, io: ProcessIO, spec: dict[str, Any] | None = None) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.io = io
        self.spec = spec
        self.pid = 0
        self.exit: Exit | None = None
        self.exited = threading.Event()
        self.console: Any = None

    @property
    def status(self) -> int:
        if self.exit is not None:
            return types.Status.STOPPED
        return types.Status.RUNNING if self.pid else types.Status.CREATED


class Container:
    def __init__(self, container_id: str, bundle: str, init: Process, handler: Any, attached: str | None) -> None:
        self.id = container_id
        self.bundle = bundle
        self.init = init
        self.execs: dict[str, Process] = {}
        self.handler = handler
        self.attached = attached  # what handler.attach_rootfs returned
        self.oom_kills = 0

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"process {exec_id} not found in container {self.id}") from None


class TaskService:
    def __init__(self, namespace: str, publisher: Publisher | None, on_shutdown: Any, log: Any = None,
                 handler: str | None = None) -> None:
        self.namespace = namespace
        self.engine = Engine(f"{STATE_ROOT}/{namespace}", log, handler)  # warnings reach the shim's log
        self.publisher = publisher
        self.containers: dict[str, Container] = {}
        self.by_pid: dict[int, Process] = {}
        self.early_exits: dict[int, Exit] = {}
        self.lock = threading.RLock()
        self.sandbox: Sandbox | None = None  # the pod's, made with its first container
        self.on_shutdown = on_shutdown
        self.enclaves: Any = None  # clave.shim.prometheus.EnclaveLedger, made with the first enclave container

    # -- helpers
    def _publish(self, event: Any) -> None:
        if self.publisher is not None:
            self.publisher.publish(event)

    def _container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"container {container_id} not found") from None

    def _on_exit(self, exit: Exit) -> None:
        with self.lock:
            process = self.by_pid.pop(exit.pid, None)
            if process is None:
                self.early_exits[exit.pid] = exit  # exited before we recorded its pid
                return
            self._finish(process, exit)

    def _finish(self, process: Process, exit: Exit) -> None:
        process.exit = exit
        if not process.exec_id:
            # The init is gone: the container's exec'd processes die with its pid namespace.
            container = self.containers.get(process.container_id)
            if container is not None:
                self._check_oom(container)
        process.io.close()
        process.exited.set()
        self._publish(ev.TaskExit(container_id=process.container_id, id=process.exec_id or process.container_id,
                                  pid=exit.pid, exit_status=exit.status, exited_at=Timestamp.from_ns(exit.at_ns)))

    def _sandbox_for(self, handler: Any, container_id: str) -> Sandbox:
        """The pod's sandbox: made by the first container's handler and started (exits flow from then on);
        later containers must be of a handler that shares it."""
        with self.lock:
            candidate = handler.sandbox(container_id)
            if self.sandbox is None:
                self.sandbox = candidate
                self.sandbox.start(self._on_exit)
            elif type(candidate) is not type(self.sandbox):
                raise Unsupported(f"container {container_id}: a {handler.name} container cannot join this pod's "
                                  f"{type(self.sandbox).__name__}")
            return self.sandbox

    def _quiet(self) -> Any:
        assert self.sandbox is not None
        return self.sandbox.quiet

    def _check_oom(self, container: Container) -> None:
        try:
            count = self.engine.oom_kills(container.id)
        except ClaveError:
            return
        if count > container.oom_kills:
            container.oom_kills = count
            self._publish(ev.TaskOOM(container_id=container.id))

    def _note_enclave(self, handler: Any, container_id: str, config: dict[str, Any]) -> None:
        """Enclave starts and refusals are counted here, for the shim's metrics: a refused container leaves no
        state to ask afterwards."""
        if handler.name != "enclave":
            return
        if self.enclaves is None:
            from clave.shim.prometheus import EnclaveLedger

            self.enclaves = EnclaveLedger()
        self.enclaves.note(container_id, config)

    def _refused(self, container_id: str, phase: str, exc: ClaveError) -> None:
        if self.enclaves is not None:
            self.enclaves.refused(container_id, phase, exc)

    def _track(self, process: Process, pid: int) -> None:
        with self.lock:
            process.pid = pid
            early = self.early_exits.pop(pid, None)
            if early is not None:
                self._finish(process, early)
            else:
                self.by_pid[pid] = process

    # -- the service
    def state(self, ctx: Context, req: task.StateRequest) -> task.StateResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        status = process.status
        if not req.exec_id and status == types.Status.RUNNING:
            try:
                if self.engine.state(req.id)["status"] == "paused":
                    status = types.Status.PAUSED
            except ClaveError:
                pass
        stdin, stdout, stderr = process.io.paths
        resp = task.StateResponse(id=req.id, bundle=container.bundle, pid=process.pid, status=status, stdin=stdin,
                                  stdout=stdout, stderr=stderr, terminal=process.io.terminal, exec_id=req.exec_id)
        if process.exit is not None:
            resp.exit_status = process.exit.status
            resp.exited_at = Timestamp.from_ns(process.exit.at_ns)
        return resp

    def create(self, ctx: Context, req: task.CreateTaskRequest) -> task.CreateTaskResponse:
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint/restore is not supported by clave")
        with self.lock:
            if req.id in self.containers:
                raise TtrpcError(Code.ALREADY_EXISTS, f"container {req.id} already exists")
        try:
            config = self.engine.load_config(req.bundle)
            handler_name = _runtime_handler(req.options)
            handler = self.engine.handler_for_config(config, handler_name)
            self._note_enclave(handler, req.id, config)
            self._sandbox_for(handler, req.id)
            attached = handler.attach_rootfs(req.bundle, [{"type": m.type, "source": m.source,
                                                           "options": list(m.options)} for m in req.rootfs])
        except ClaveError as exc:
            self._refused(req.id, "create", exc)
            raise from_clave_error(exc) from None
        io = ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal, {"CONTAINER_ID": req.id,
                                                                        "CONTAINER_NAMESPACE": self.namespace})
        init = Process(req.id, "", io)
        console = None
        try:
            opts = CreateOptions(bundle=req.bundle)
            if req.terminal:
                from clave.linux.console import ConsoleSocket

                console = ConsoleSocket()
                opts.console_socket = console.socket_path
            else:
                opts.stdio = io.open()
            with self._quiet():
                state = self.engine.create(req.id, opts, config, handler_name)
            if console is not None:
                console.accept()
                io.attach_master(console.master)
            io.after_start()
        except ClaveError as exc:
            io.close()
            handler.detach_rootfs(attached)
            self._refused(req.id, "create", exc)
            raise from_clave_error(exc) from None
        finally:
            if console is not None:
                console.close_listener()
        container = Container(req.id, req.bundle, init, handler, attached)
        with self.lock:
            self.containers[req.id] = container
            self._track(init, state.pid)
            self._publish(ev.TaskCreate(container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
                                        io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                                                     terminal=req.terminal),
                                        checkpoint=req.checkpoint, pid=state.pid))
        return task.CreateTaskResponse(pid=state.pid)

    def start(self, ctx: Context, req: task.StartRequest) -> task.StartResponse:
        container = self._container(req.id)
        if not req.exec_id:
            # Holding the lock keeps the reaper from announcing an exit before the start.
            with self._quiet(), self.lock:
                try:
                    self.engine.start(req.id)
                except ClaveError as exc:
                    self._refused(req.id, "start", exc)
                    raise from_clave_error(exc) from None
                if self.enclaves is not None:
                    self.enclaves.started(req.id)
                self._publish(ev.TaskStart(container_id=req.id, pid=container.init.pid))
            return task.StartResponse(pid=container.init.pid)
        process = container.process(req.exec_id)
        spec = process.spec or {}
        console = None
        with process.io.handover:
            try:
                opts = ExecOptions()
                if process.io.terminal:
                    from clave.linux.console import ConsoleSocket

                    console = ConsoleSocket()
                    opts.console_socket = console.socket_path
                else:
                    opts.stdio = process.io.open()
                with self._quiet():
                    pid = self.engine.exec(req.id, spec, opts)
                if console is not None:
                    console.accept()
                    process.io.attach_master(console.master)
                process.io.after_start()
            except ClaveError as exc:
                process.io.close()
                raise from_clave_error(exc) from None
            finally:
                if console is not None:
                    console.close_listener()
        with self.lock:  # exec-started before the exit the reaper may already hold
            self._publish(ev.TaskExecStarted(container_id=req.id, exec_id=req.exec_id, pid=pid))
            self._track(process, pid)
        return task.StartResponse(pid=pid)

    def delete(self, ctx: Context, req: task.DeleteRequest) -> task.DeleteResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        if req.exec_id:
            if process.exit is None and process.pid:
                raise TtrpcError(Code.FAILED_PRECONDITION, f"process {req.exec_id} is still running")
            container.execs.pop(req.exec_id, None)
        else:
            try:
                with self._quiet():
                    self.engine.delete(req.id, force=process.exit is None)
            except NotFound:
                pass
            except ClaveError as exc:
                raise from_clave_error(exc) from None
            process.io.close()
            container.handler.detach_rootfs(container.attached)
            with self.lock:
                self.containers.pop(req.id, None)
            if self.enclaves is not None:
                self.enclaves.forget(req.id)
        exit = process.exit
        resp = task.DeleteResponse(pid=process.pid, exit_status=exit.status if exit else 137,
                                   exited_at=Timestamp.from_ns(exit.at_ns) if exit else Timestamp.now())
        if not req.exec_id:
            self._publish(ev.TaskDelete(container_id=req.id, pid=process.pid, exit_status=resp.exit_status,
                                        exited_at=resp.exited_at, id=req.id))
        return resp

    def pids(self, ctx: Context, req: task.PidsRequest) -> task.PidsResponse:
        self._container(req.id)
        try:
            pids = self.engine.pids(req.id)
        except ClaveError as exc:
            raise from_clave_error(exc) from None
        container = self.containers[req.id]
        execs = {p.pid: p.exec_id for p in container.execs.values() if p.pid}
        processes = []
        for pid in pids:
            info = types.ProcessInfo(pid=pid)
            if pid in execs:  # runc's shim's ProcessDetails{exec_id = 1}: the type ctr and containerd decode
                exec_id = execs[pid].encode()
                size, length = bytearray(), len(exec_id)
                while length > 0x7F:
                    size.append(length & 0x7F | 0x80)
                    length >>= 7
                info.info = AnyMessage(type_url="containerd.runc.v1.ProcessDetails",
                                       value=b"\x0a" + bytes(size) + bytes([length]) + exec_id)
            processes.append(info)
        return task.PidsResponse(processes=processes)

    def pause(self, ctx: Context, req: task.PauseRequest) -> Empty:
        self._engine_call(self.engine.pause, req.id)
        self._publish(ev.TaskPaused(container_id=req.id))
        return Empty()

    def resume(self, ctx: Context, req: task.ResumeRequest) -> Empty:
        self._engine_call(self.engine.resume, req.id)
        self._publish(ev.TaskResumed(container_id=req.id))
        return Empty()

    def checkpoint(self, ctx: Context, req: task.CheckpointTaskRequest) -> Empty:
        raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint is not supported by clave")

    def kill(self, ctx: Context, req: task.KillRequest) -> Empty:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        if process.exit is not None:
            raise TtrpcError(Code.NOT_FOUND, "process already finished")
        try:
            if req.exec_id:
                self.engine.signal_process(req.id, process.pid, req.signal)
            else:
                self.engine.kill(req.id, req.signal, all_processes=req.all)
        except (NotFound, WrongState):
            raise TtrpcError(Code.NOT_FOUND, "process already finished") from None
        except ClaveError as exc:
            raise from_clave_error(exc) from None
        return Empty()

    def exec(self, ctx: Context, req: task.ExecProcessRequest) -> Empty:
        container = self._container(req.id)
        if req.exec_id in container.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec {req.exec_id} already exists")
        try:
            spec = fastjson.loads(req.spec.value) if req.spec is not None else {}
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec spec: {exc}") from None
        try:
            oci.validate_process(spec, "exec spec")
        except oci.ConfigError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        spec["terminal"] = req.terminal
        container.execs[req.exec_id] = Process(req.id, req.exec_id,
                                               ProcessIO(req.stdin, req.stdout, req.stderr, req.terminal,
                                                         {"CONTAINER_ID": req.id,
                                                          "CONTAINER_NAMESPACE": self.namespace}), spec)
        self._publish(ev.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return Empty()

    def resize_pty(self, ctx: Context, req: task.ResizePtyRequest) -> Empty:
        process = self._container(req.id).process(req.exec_id)
        process.io.resize(req.width, req.height)
        return Empty()

    def close_io(self, ctx: Context, req: task.CloseIORequest) -> Empty:
        process = self._container(req.id).process(req.exec_id)
        if req.stdin:
            process.io.close_stdin()
        return Empty()

    def update(self, ctx: Context, req: task.UpdateTaskRequest) -> Empty:
        self._container(req.id)
        try:
            resources = fastjson.loads(req.resources.value) if req.resources is not None else {}
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"resources: {exc}") from None
        self._engine_call(self.engine.update, req.id, resources)
        return Empty()

    def wait(self, ctx: Context, req: task.WaitRequest) -> task.WaitResponse:
        process = self._container(req.id).process(req.exec_id)
        process.exited.wait()
        assert process.exit is not None
        return task.WaitResponse(exit_status=process.exit.status, exited_at=Timestamp.from_ns(process.exit.at_ns))

    def stats(self, ctx: Context, req: task.StatsRequest) -> task.StatsResponse:
        """containerd's v1 Metrics, or its v2 Metrics where the statistics come from cgroup v2 only."""
        from clave.shim.metrics import to_metrics, to_metrics_v2

        container = self._container(req.id)
        stats = self._engine_call(self.engine.stats, req.id)
        metrics = to_metrics_v2(stats) if container.handler.stats_format() == "v2" else to_metrics(stats)
        return task.StatsResponse(stats=AnyMessage.pack(metrics))

    def connect(self, ctx: Context, req: task.ConnectRequest) -> task.ConnectResponse:
        container = self.containers.get(req.id)
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0,
                                    version=VERSION)

    def shutdown(self, ctx: Context, req: task.ShutdownRequest) -> Empty:
        with self.lock:
            if self.containers and not req.now:
                return Empty()
            if self.sandbox is not None:
                self.sandbox.stop()  # the pod's lifetime ends with its shim (for a VM: the VM)
                self.sandbox = None
        threading.Timer(0.05, self.on_shutdown).start()  # after this reply has gone out
        return Empty()

    def _engine_call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ClaveError as exc:
            raise from_clave_error(exc) from None


def _runtime_handler(options: AnyMessage | None) -> str | None:
    """The handler a containerd runtime stands for: containerd passes a non-runc shim its runtime's options
    (runtimeoptions.v1.Options), whose ConfigPath names the file `clave node install` wrote (``handler = ...``)."""
    if options is None or not options.type_url.endswith("runtimeoptions.v1.Options"):
        return None
    from clave.k8s import runtimeconfig
    from clave.proto.generated.runtimeoptions_v1 import Options

    try:
        decoded = Options.decode(options.value)
    except ValueError as exc:
        raise InvalidArgument(f"runtime options: {exc}") from None
    if decoded.config_body:
        return runtimeconfig.parse(decoded.config_body, "runtime options").handler
    if not decoded.config_path:
        return None
    try:
        with open(decoded.config_path) as f:
            text = f.read()
    except OSError as exc:
        raise InvalidArgument(f"runtime options: {decoded.config_path}: {exc.strerror}") from None
    return runtimeconfig.parse(text, decoded.config_path).handler
