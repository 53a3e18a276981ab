"""The agent's AgentService and Health implementations over Clave's engine (inside the guest)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import struct
import threading
import time

from clave import __version__
from clave.engine.container import Engine
from clave.errors import ClaveError, WrongState
from clave.handlers import HANDLER_ANNOTATION
from clave.handlers.base import CreateOptions, ExecOptions, Exit
from clave.handlers.linux import ReaperSandbox
from clave.proto.generated import clave_agent_v1 as pb
from clave.proto.generated.google_protobuf import Empty
from clave.ttrpc import Code, TtrpcError, from_clave_error
from clave.vm.agent import disks
from clave.vm.agent.pressure import PressureWatch
from clave.vm.agent.tpm import GuestTpm, TpmUnavailable
from clave.vm.measure import CONTAINER_PCR

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from clave.ttrpc import Context, ServerStream

STATE_ROOT = "/run/clave"  # the guest engine's state
WORK_ROOT = "/run/clave-agent"  # bundles written for the engine, sandbox files
MOUNT_ROOT = "/run/clave-agent/mounts"  # storages must be mounted below /run
GUEST_CGROUPS = "/clave"  # the containers' cgroups, under the guest's cgroup2 root
CHUNK = 64 << 10
# What creating and starting a container imports in the guest (see AgentService._warm).
WARM_MODULES = (
    "clave.config.spec", "clave.config.defaults", "clave.handlers.native", "clave.linux.spawn",
    "clave.linux.rootfs", "clave.linux.process", "clave.linux.capabilities", "clave.linux.seccomp",
    "clave.linux.cgroups", "clave.linux.cgroups.v2", "clave.linux.namespaces", "clave.linux.rlimits",
    "clave.linux.console", "clave.linux.enter", "clave.linux.trampoline", "clave.linux.channel",
    "clave.linux.freezer", "clave.linux.cgroups.stats", "clave.linux.cgroups.devices_bpf", "clave.enclave.config",
    "socket",  # CreateSandbox's sethostname
)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
TIOCSWINSZ = 0x5414
BUSYBOX = "/bin/busybox"
ROUTE_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}


class Process:
    """A container's init or exec'd process: its pipes (or pty master), its exit, its IO stream's end."""

    def __init__(self, container_id: str, exec_id: str, terminal: bool) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.terminal = terminal
        self.pid = 0
        self.exit: Exit | None = None
        self.exited = threading.Event()
        self.stdin_w = -1  # the agent's end of the process's stdin
        self.outputs: dict[int, int] = {}  # fd number (1, 2) -> the agent's read end
        self.child_ends: list[int] = []  # closed once the process holds them
        self.attached = False
        self.io_done = threading.Event()
        self.lock = threading.Lock()

    def make_pipes(self) -> tuple[int, int, int]:
        if self.terminal:
            return (-1, -1, -1)
        stdin_r, self.stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.outputs = {1: out_r, 2: err_r}
        self.child_ends = [stdin_r, out_w, err_w]
        return stdin_r, out_w, err_w

    def release_child_ends(self) -> None:
        for fd in self.child_ends:
            os.close(fd)
        self.child_ends = []

    def close_stdin(self) -> None:
        with self.lock:
            if self.stdin_w >= 0 and not self.terminal:
                os.close(self.stdin_w)
            self.stdin_w = -1

    def close_all(self) -> None:
        self.close_stdin()
        self.release_child_ends()
        for fd in self.outputs.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.outputs = {}
        self.io_done.set()


class Container:
    def __init__(self, container_id: str, init: Process, mounts: list[str]) -> None:
        self.id = container_id
        self.init = init
        self.execs: dict[str, Process] = {}
        self.mounts = mounts  # storages mounted for it, unmounted at remove
        self.oom_kills = 0  # the kernel's, as its cgroup counts them
        self.pressure_kills = 0  # the agent's, of a container thrashing at its memory limit (PressureWatch)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"process {exec_id} not found in container {self.id}") from None


class AgentService:
    def __init__(self) -> None:
        self.engine = Engine(STATE_ROOT, handler="native")  # the Linux handler, whatever the host chose
        self.containers: dict[str, Container] = {}
        self.by_pid: dict[int, Process] = {}
        self.early_exits: dict[int, Exit] = {}
        self.lock = threading.RLock()
        self.reaper = ReaperSandbox()  # the agent is the subreaper of every container process
        self.oom_events: list[str] = []
        self.oom_cond = threading.Condition(self.lock)
        self.sandbox_id = ""
        self.configs: dict[str, bytes] = {}  # container id -> the OCI config as received (MeasureContainer)
        self.tpm = GuestTpm()
        self.warm = threading.Event()
        self.pressure = PressureWatch(self._pressure_killed)
        os.makedirs(MOUNT_ROOT, exist_ok=True)

    def start(self) -> None:
        self.reaper.start(self._on_exit)
        self.tpm.start()
        threading.Thread(target=self._warm, name="warm", daemon=True).start()

    def _warm(self) -> None:
        """Import what a container's create and start run, after Health answers: under TCG each cold import
        costs tens of milliseconds, and a VM template saved warm gives every clone its imports for free."""
        import importlib

        for name in WARM_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001  # a module that cannot load here fails later, where it is used
                pass
        try:  # the default seccomp profile's program, in the guest's cache (on /run: in a template's memory)
            from clave.config.defaults import default_spec
            from clave.linux import seccomp

            seccomp.compile_cached(default_spec()["linux"]["seccomp"])
        except Exception:  # noqa: BLE001  # compiled at the first create instead
            pass
        self.warm.set()

    # -- exits -------------------------------------------------------------------------------------------------
    def _on_exit(self, exit: Exit) -> None:
        with self.lock:
            process = self.by_pid.pop(exit.pid, None)
            if process is None:
                self.early_exits[exit.pid] = exit
                return
            self._finish(process, exit)

    def _finish(self, process: Process, exit: Exit) -> None:
        process.exit = exit
        if not process.exec_id:
            container = self.containers.get(process.container_id)
            if container is not None:
                self._check_oom(container)
        if not process.attached:
            process.io_done.set()  # nobody reads its output: nothing to wait for
        process.exited.set()

    def _check_oom(self, container: Container) -> None:
        try:
            count = self.engine.oom_kills(container.id)
        except ClaveError:
            return
        if count > container.oom_kills:
            container.oom_kills = count
            self.oom_events.append(container.id)
            self.oom_cond.notify_all()

    def _pressure_killed(self, container_id: str) -> None:
        with self.lock:
            container = self.containers.get(container_id)
            if container is not None:
                container.pressure_kills += 1
                self.oom_events.append(container_id)
                self.oom_cond.notify_all()

    def _track(self, process: Process, pid: int) -> None:
        with self.lock:
            process.pid = pid
            early = self.early_exits.pop(pid, None)
            if early is not None:
                self._finish(process, early)
            else:
                self.by_pid[pid] = process

    def _container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, f"container {container_id} not found") from None

    # -- storages ----------------------------------------------------------------------------------------------
    def _mount_storages(self, storages: list[pb.Storage]) -> list[str]:
        done: list[str] = []
        try:
            for storage in storages:
                done.append(_mount_storage(storage))
        except BaseException:
            for target in reversed(done):
                _unmount(target)
            raise
        return done

    # -- AgentService ------------------------------------------------------------------------------------------
    def create_sandbox(self, ctx: Context, req: pb.CreateSandboxRequest) -> Empty:
        import socket

        if req.kernel_modules:
            raise TtrpcError(Code.UNIMPLEMENTED, "loading kernel modules on request is not supported")
        if req.hostname:
            socket.sethostname(req.hostname)
        if req.machine_id:
            if len(req.machine_id) != 32 or not all(c in "0123456789abcdef" for c in req.machine_id):
                raise TtrpcError(Code.INVALID_ARGUMENT, "machine_id: 32 lowercase hex digits")
            with open("/run/machine-id", "w") as f:
                f.write(req.machine_id + "\n")
        os.makedirs(WORK_ROOT, exist_ok=True)
        if req.dns:
            with open(os.path.join(WORK_ROOT, "resolv.conf"), "w") as f:
                f.write("".join(f"{line}\n" for line in req.dns))
        self._mount_storages(list(req.storages))
        self.sandbox_id = req.sandbox_id
        return Empty()

    def destroy_sandbox(self, ctx: Context, req: pb.DestroySandboxRequest) -> Empty:
        for container_id in list(self.containers):
            self.remove_container(ctx, pb.RemoveContainerRequest(container_id=container_id))
        return Empty()

    def create_container(self, ctx: Context, req: pb.CreateContainerRequest) -> Empty:
        cid = req.container_id
        with self.lock:
            if cid in self.containers:
                raise TtrpcError(Code.ALREADY_EXISTS, f"container {cid} already exists")
        try:
            config = json.loads(req.oci_json)
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"oci_json: {exc}") from None
        if not isinstance(config, dict) or not isinstance(config.get("process"), dict):
            raise TtrpcError(Code.INVALID_ARGUMENT, "oci_json: not an OCI config with a process")
        mounts = self._mount_storages(list(req.storages))
        bundle = os.path.join(WORK_ROOT, "bundles", cid)
        init = Process(cid, "", bool(config["process"].get("terminal")))
        try:
            os.makedirs(bundle, exist_ok=False)
            guest_config = _guest_config(config, cid)
            _apply_net_sysctls(config)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                f.write(json.dumps(guest_config))  # the C encoder (json.dump's chunks are pure Python)
            config = self.engine.validated(guest_config)  # not read back: under emulation every step counts
            pid = self._spawn(init, lambda opts: self.engine.create(cid, CreateOptions(bundle=bundle, **opts),
                                                                    config).pid)
        except BaseException as exc:
            init.close_all()
            for target in reversed(mounts):
                _unmount(target)
            shutil.rmtree(bundle, ignore_errors=True)
            if isinstance(exc, ClaveError):
                raise from_clave_error(exc) from None
            if isinstance(exc, FileExistsError):
                raise TtrpcError(Code.ALREADY_EXISTS, f"container {cid} already exists") from None
            raise
        with self.lock:
            self.containers[cid] = Container(cid, init, mounts)
            self.configs[cid] = req.oci_json.encode()
            self._track(init, pid)
        self.pressure.watch(cid, _cgroup_dir(cid))
        return Empty()

    def _spawn(self, process: Process, run: Any) -> int:
        """Start ``process`` through the engine with its pipes, or with a pty whose master comes back over
        runc's console socket."""
        console = None
        try:
            if process.terminal:
                from clave.linux.console import ConsoleSocket

                console = ConsoleSocket()
                opts: dict[str, Any] = {"console_socket": console.socket_path}
            else:
                opts = {"stdio": process.make_pipes()}
            with self.reaper.quiet:
                pid: int = run(opts)
            if console is not None:
                console.accept()
                process.outputs = {1: console.master}
                process.stdin_w = os.dup(console.master)
            process.release_child_ends()
            return pid
        finally:
            if console is not None:
                console.close_listener()

    def start_container(self, ctx: Context, req: pb.StartContainerRequest) -> Empty:
        self._container(req.container_id)
        with self.reaper.quiet:
            try:
                self.engine.start(req.container_id)
            except ClaveError as exc:
                raise from_clave_error(exc) from None
        return Empty()

    def exec_process(self, ctx: Context, req: pb.ExecProcessRequest) -> Empty:
        container = self._container(req.container_id)
        if not req.exec_id or req.exec_id in container.execs:
            raise TtrpcError(Code.ALREADY_EXISTS if req.exec_id else Code.INVALID_ARGUMENT,
                             f"exec id {req.exec_id!r}: {'already used' if req.exec_id else 'required'}")
        try:
            spec = json.loads(req.process_json)
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"process_json: {exc}") from None
        if not isinstance(spec, dict):
            raise TtrpcError(Code.INVALID_ARGUMENT, "process_json: not an OCI process object")
        process = Process(req.container_id, req.exec_id, bool(spec.get("terminal")))
        try:
            pid = self._spawn(process, lambda opts: self.engine.exec(req.container_id, spec, ExecOptions(**opts)))
        except ClaveError as exc:
            process.close_all()
            raise from_clave_error(exc) from None
        with self.lock:
            container.execs[req.exec_id] = process
            self._track(process, pid)
        return Empty()

    def signal_process(self, ctx: Context, req: pb.SignalProcessRequest) -> Empty:
        container = self._container(req.container_id)
        if not req.exec_id:
            try:
                self.engine.kill(req.container_id, req.signal)
            except ClaveError as exc:
                raise from_clave_error(exc) from None
            return Empty()
        process = container.process(req.exec_id)
        if process.exit is None and process.pid:
            try:
                os.kill(process.pid, req.signal)
            except ProcessLookupError:
                pass
        return Empty()

    def wait_process(self, ctx: Context, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        process = self._container(req.container_id).process(req.exec_id)
        remaining = ctx.time_remaining()
        if not process.exited.wait(remaining) or not process.io_done.wait(ctx.time_remaining()):
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"process {req.exec_id or req.container_id} still running")
        assert process.exit is not None
        return pb.WaitProcessResponse(status=process.exit.status)

    def remove_container(self, ctx: Context, req: pb.RemoveContainerRequest) -> Empty:
        container = self._container(req.container_id)
        self.pressure.forget(req.container_id)
        try:
            with self.reaper.quiet:
                self.engine.delete(req.container_id, force=True)
        except ClaveError as exc:
            if "does not exist" not in str(exc):
                raise from_clave_error(exc) from None
        deadline = time.monotonic() + (req.timeout or 10)
        for process in [container.init, *container.execs.values()]:
            if process.pid and not process.exited.wait(max(0.0, deadline - time.monotonic())):
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"container {req.container_id}: processes still running")
            process.io_done.wait(max(0.0, deadline - time.monotonic()))
            process.close_all()
        for target in reversed(container.mounts):
            _unmount(target)
        shutil.rmtree(os.path.join(WORK_ROOT, "bundles", req.container_id), ignore_errors=True)
        with self.lock:
            self.containers.pop(req.container_id, None)
            self.configs.pop(req.container_id, None)
        return Empty()

    def update_container(self, ctx: Context, req: pb.UpdateContainerRequest) -> Empty:
        self._container(req.container_id)
        try:
            resources = json.loads(req.resources_json or "{}")
            self.engine.update(req.container_id, resources)
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"resources_json: {exc}") from None
        except ClaveError as exc:
            raise from_clave_error(exc) from None
        self.pressure.watch(req.container_id, _cgroup_dir(req.container_id))  # a memory limit it may have now
        return Empty()

    def stats_container(self, ctx: Context, req: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        self._container(req.container_id)
        try:
            stats = self.engine.stats(req.container_id)
        except WrongState:
            stats = {}  # stopped: only its OOM kills are left to tell (the host asks after the init's exit)
        except ClaveError as exc:
            raise from_clave_error(exc) from None
        container = self.containers.get(req.container_id)
        agent_kills = container.pressure_kills if container is not None else 0
        try:
            stats["oom_kills"] = self.engine.oom_kills(req.container_id) + agent_kills
        except ClaveError:
            pass
        return _stats_message(stats)

    def pause_container(self, ctx: Context, req: pb.PauseContainerRequest) -> Empty:
        self._container(req.container_id)
        try:
            self.engine.pause(req.container_id)
        except ClaveError as exc:
            raise from_clave_error(exc) from None
        return Empty()

    def resume_container(self, ctx: Context, req: pb.ResumeContainerRequest) -> Empty:
        self._container(req.container_id)
        try:
            self.engine.resume(req.container_id)
        except ClaveError as exc:
            raise from_clave_error(exc) from None
        return Empty()

    def close_stdin(self, ctx: Context, req: pb.CloseStdinRequest) -> Empty:
        self._container(req.container_id).process(req.exec_id).close_stdin()
        return Empty()

    def tty_win_resize(self, ctx: Context, req: pb.TtyWinResizeRequest) -> Empty:
        process = self._container(req.container_id).process(req.exec_id)
        if not process.terminal or 1 not in process.outputs:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.container_id} has no terminal")
        fcntl.ioctl(process.outputs[1], TIOCSWINSZ, struct.pack("HHHH", req.row, req.column, 0, 0))
        return Empty()

    def reseed_random_dev(self, ctx: Context, req: pb.ReseedRandomDevRequest) -> Empty:
        if not req.data:
            raise TtrpcError(Code.INVALID_ARGUMENT, "no random data")
        fd = os.open("/dev/random", os.O_WRONLY)
        try:
            # credited entropy (RNDADDENTROPY: bits, length, bytes), then a reseed of the crng from it
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(req.data) * 8, len(req.data)) + req.data)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
        return Empty()

    def set_guest_date_time(self, ctx: Context, req: pb.SetGuestDateTimeRequest) -> Empty:
        time.clock_settime_ns(time.CLOCK_REALTIME, req.Sec * 1_000_000_000 + req.Usec * 1000)
        return Empty()

    # -- templates and measured boot (clave.vm.template, clave.vm.agent.tpm) ------------------------------------
    def set_disk_serials(self, ctx: Context, req: pb.SetDiskSerialsRequest) -> Empty:
        disks.SLOTS.update(req.serials)
        return Empty()

    def renew_tpm_identity(self, ctx: Context, req: pb.RenewTpmIdentityRequest) -> Empty:
        with _tpm_errors():
            self.tpm.renew_identity(req.entropy)
        return Empty()

    def measure_container(self, ctx: Context, req: pb.MeasureContainerRequest) -> pb.MeasureContainerResponse:
        self._container(req.container_id)
        if not req.image_digest:
            raise TtrpcError(Code.INVALID_ARGUMENT, "image_digest: required")
        with _tpm_errors():
            value = self.tpm.measure_container(req.container_id, req.image_digest, self.configs[req.container_id])
        return pb.MeasureContainerResponse(pcr=CONTAINER_PCR, value=value)

    def get_quote(self, ctx: Context, req: pb.GetQuoteRequest) -> pb.GetQuoteResponse:
        with _tpm_errors():
            evidence, log = self.tpm.quote(req.nonce)
        return pb.GetQuoteResponse(evidence=evidence, event_log=log)

    def get_oom_event(self, ctx: Context, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        with self.oom_cond:
            while not self.oom_events:
                remaining = ctx.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise TtrpcError(Code.DEADLINE_EXCEEDED, "no OOM event")
                self.oom_cond.wait(min(remaining, 1.0) if remaining is not None else 1.0)
                for container in self.containers.values():  # an OOM kill need not end the init
                    self._check_oom(container)
            return pb.OOMEvent(container_id=self.oom_events.pop(0))

    def warm_up(self, ctx: Context, req: pb.WarmUpRequest) -> Empty:
        """A template's last step before it is saved: busybox true through create, start, wait and remove, on a
        tmpfs root of its own. What the first container of a VM runs for the first time (bytecode the
        interpreter then specialises, the kernel's caches, a lazy import) costs a clone about 200 ms of
        emulated CPU otherwise."""
        from clave.config.defaults import default_spec

        self.warm.wait(ctx.time_remaining())
        cid = "clave-warm-up"
        root = os.path.join(WORK_ROOT, cid)
        os.makedirs(os.path.join(root, "bin"))
        try:
            shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
            config = default_spec()
            config["process"].update({"args": ["/bin/busybox", "true"], "terminal": False})
            config["root"] = {"path": root, "readonly": True}
            self.create_container(ctx, pb.CreateContainerRequest(container_id=cid, oci_json=json.dumps(config)))
            init = self.containers[cid].init
            self.start_container(ctx, pb.StartContainerRequest(container_id=cid))
            if not init.exited.wait(ctx.time_remaining()) or init.exit is None or init.exit.status != 0:
                raise TtrpcError(Code.INTERNAL, "warm-up container: busybox true failed")
        finally:
            if cid in self.containers:
                self.containers[cid].init.close_all()  # nothing attached its stdio
                self.remove_container(ctx, pb.RemoveContainerRequest(container_id=cid, timeout=5))
            shutil.rmtree(root, ignore_errors=True)
        return Empty()

    def get_guest_details(self, ctx: Context, req: pb.GuestDetailsRequest) -> pb.GuestDetailsResponse:
        """Answered once the agent is warm (a template is saved after it)."""
        self.warm.wait(ctx.time_remaining())
        details = pb.AgentDetails(version=__version__, init_daemon=os.getpid() == 1, storage_handlers=["blk"],
                                  supports_seccomp=True)
        return pb.GuestDetailsResponse(agent_details=details, kernel_release=os.uname().release)

    # -- network (Kata's UpdateInterface / UpdateRoutes; the host side is clave.vm.network) ---------------------
    def update_interface(self, ctx: Context, req: pb.UpdateInterfaceRequest) -> pb.Interface:
        """The NIC with the host interface's MAC (lo: by name) takes its name, MTU and addresses, and comes up:
        the containers share the guest's network namespace, so this is what they see."""
        iface = req.interface
        if iface is None or not iface.name:
            raise TtrpcError(Code.INVALID_ARGUMENT, "UpdateInterface: an interface with a name is required")
        link = _link_by_mac(iface.hwAddr) if iface.hwAddr else iface.name
        if not os.path.exists(f"/sys/class/net/{link}"):
            raise TtrpcError(Code.NOT_FOUND, f"UpdateInterface: no interface {link!r} in the guest")
        if link != iface.name:
            if os.path.exists(f"/sys/class/net/{iface.name}"):
                # another NIC has the name: move it aside (its own UpdateInterface names it, found by its MAC)
                with open(f"/sys/class/net/{iface.name}/ifindex") as f:
                    spare = f"nic{f.read().strip()}"
                _ip("link", "set", "dev", iface.name, "down")
                _ip("link", "set", "dev", iface.name, "name", spare)
            _ip("link", "set", "dev", link, "down")
            _ip("link", "set", "dev", link, "name", iface.name)
        if iface.mtu:
            _ip("link", "set", "dev", iface.name, "mtu", str(iface.mtu))
        try:  # the namespace already holds these addresses: no duplicate detection (seconds under TCG)
            with open(f"/proc/sys/net/ipv6/conf/{iface.name}/accept_dad", "w") as f:
                f.write("0")
        except OSError:
            pass
        if iface.name != "lo":
            _ip("addr", "flush", "dev", iface.name)
        _ip("link", "set", "dev", iface.name, "up")
        for address in iface.IPAddresses:
            family = ["-6"] if address.family == pb.IPFamily.v6 else []
            _ip(*family, "addr", "add", f"{address.address}/{address.mask}", "dev", iface.name, exists_ok=True)
        return iface

    def update_routes(self, ctx: Context, req: pb.UpdateRoutesRequest) -> pb.Routes:
        """Add (or replace) each route, in the order given: on-link routes come before those through them."""
        routes = req.routes or pb.Routes()
        for route in routes.Routes:
            args = ["-6"] if route.family == pb.IPFamily.v6 else []
            args += ["route", "replace", route.dest or "default"]
            if route.gateway:
                args += ["via", route.gateway]
            if route.device:
                args += ["dev", route.device]
            if route.source:
                args += ["src", route.source]
            if route.scope:
                args += ["scope", ROUTE_SCOPES.get(route.scope, str(route.scope))]
            _ip(*args)
        return routes

    # -- the pod's key broker resources (clave.vm.kbs is the host's end of the tunnel) --------------------------
    def fetch_resources(self, ctx: Context, stream: ServerStream) -> bytes:
        """Fetch each resource from the key broker with this guest's TPM evidence (bound to the broker's nonce
        and an ephemeral key, TLS end to end through the host's tunnel) and write it into the created container
        (on one of its tmpfs mounts, readable by its user only), before the container starts."""
        import socket as sockets

        first = stream.recv()
        if first is None:
            raise TtrpcError(Code.INVALID_ARGUMENT, "FetchResources: no job")
        try:
            job = json.loads(pb.IORequest.decode(first).data)
            container = self._container(str(job["container_id"]))
            resources = [(str(r), str(p)) for r, p in job["resources"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"FetchResources: malformed job: {exc}") from None
        ours, theirs = sockets.socketpair()
        threading.Thread(target=_tunnel_out, args=(ours, stream), daemon=True, name="kbs-out").start()
        threading.Thread(target=_tunnel_in, args=(ours, stream), daemon=True, name="kbs-in").start()
        used = [False]

        def open_stream() -> sockets.socket:  # one connection: the KBS client keeps it alive for its steps
            if used[0]:
                raise OSError("the tunnel to the key broker carries one connection")
            used[0] = True
            return theirs

        result: dict[str, Any] = {"ok": True}
        try:
            with _tpm_errors():
                for resource, path in resources:
                    secret = _fetch_one(self.tpm, str(job["url"]), resource, job.get("ca_pem"), open_stream)
                    with self.reaper.quiet:  # the writer is our child: the reaper must leave its exit to us
                        _write_into(container.init.pid, path, secret, int(job.get("uid", 0)), int(job.get("gid", 0)))
        except TtrpcError as exc:
            result = {"ok": False, "error": exc.message}
        except Exception as exc:  # noqa: BLE001  # the KBS client's and the writer's errors, as one line
            result = {"ok": False, "error": str(exc)}
        finally:
            theirs.close()
        stream.send(pb.IOChunk(fd=2, data=json.dumps(result).encode()).encode())
        return b""

    # -- stdio -------------------------------------------------------------------------------------------------
    def io_stream(self, ctx: Context, stream: ServerStream) -> bytes:
        first = stream.recv()
        if first is None:
            raise TtrpcError(Code.INVALID_ARGUMENT, "AttachIO: no request")
        req = pb.IORequest.decode(first)
        process = self._container(req.container_id).process(req.exec_id)
        with process.lock:
            if process.attached:
                raise TtrpcError(Code.ALREADY_EXISTS, f"process {req.exec_id or req.container_id}: IO attached")
            process.attached = True
            process.io_done.clear()
        if req.data:
            _write_stdin(process, req.data)
        threading.Thread(target=self._pump_stdin, args=(process, stream), daemon=True, name="stdin").start()
        try:
            self._pump_output(process, stream)
        finally:
            with process.lock:
                process.attached = False  # a later connection may attach again (output resumes from there)
            process.io_done.set()
        return b""

    def _pump_stdin(self, process: Process, stream: ServerStream) -> None:
        while True:
            data = stream.recv()
            if data is None:  # the host closed its side: end of file for the process
                if not process.terminal:
                    process.close_stdin()
                return
            chunk = pb.IORequest.decode(data).data
            if chunk:
                _write_stdin(process, chunk)

    def _pump_output(self, process: Process, stream: ServerStream) -> None:
        offsets = dict.fromkeys(process.outputs, 0)
        fds = {fd: num for num, fd in process.outputs.items()}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while fds:
            for fd, _events in poller.poll():
                num = fds.get(fd)
                if num is None:
                    continue
                try:
                    data = os.read(fd, CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: the pty's last writer closed it
                        raise
                    data = b""
                if not data:
                    poller.unregister(fd)
                    del fds[fd]
                    continue
                stream.send(pb.IOChunk(fd=num, data=data, offset=offsets[num]).encode())
                offsets[num] += len(data)


@contextlib.contextmanager
def _tpm_errors() -> Iterator[None]:
    """TPM failures as ttrpc codes: no TPM is the caller's mistake, a failing TPM command is internal."""
    try:
        yield
    except TpmUnavailable as exc:
        raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from None
    except (RuntimeError, ValueError, OSError) as exc:
        raise TtrpcError(Code.INTERNAL, f"TPM: {exc}") from None


def _fetch_one(tpm: GuestTpm, url: str, resource: str, ca_pem: str | None, open_stream: Any) -> bytes:
    from clave.kbs import client

    ca_file = None
    fd = -1
    if ca_pem:
        fd = os.memfd_create("kbs-ca", os.MFD_CLOEXEC)
        os.write(fd, ca_pem.encode())
        ca_file = f"/proc/self/fd/{fd}"
    try:
        return client.fetch_resource(url, resource, lambda data: ("tpm", tpm.quote(data)[0]), ca_file=ca_file,
                                     tee="tpm", open_stream=open_stream, timeout=60)
    finally:
        if fd >= 0:
            os.close(fd)


def _write_into(pid: int, path: str, secret: bytes, uid: int, gid: int) -> None:
    """Write a secret at ``path`` inside the container of init ``pid``: a child joins its mount namespace (its
    root and mounts are then the container's; symlinks resolve there) and writes it on a tmpfs mount only."""
    from clave.linux.rootfs import filesystem_type

    # The container's own view of its mounts (in its mount namespace, /proc/self is not ours to read).
    if filesystem_type(os.path.dirname(path) or "/", f"/proc/{pid}/mountinfo") != "tmpfs":
        raise TtrpcError(Code.FAILED_PRECONDITION, f"{path} is not on a tmpfs mount of the container: secrets are "
                                                   "written only to memory (add a tmpfs mount there)")
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        try:
            from clave.enclave.provision import write_secret
            from clave.linux import sys as lsys

            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            lsys.setns(fd, lsys.CLONE_NEWNS)
            os.chdir("/")
            write_secret(path, secret, uid, gid, checked=True)
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001  # reported to the parent as one line
            os.write(write_fd, str(exc).encode(errors="replace"))
            os._exit(1)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        error = pipe.read().decode(errors="replace")
    os.waitpid(child, 0)
    if error:
        raise TtrpcError(Code.FAILED_PRECONDITION, error)


def _tunnel_out(sock: Any, stream: ServerStream) -> None:
    """The guest's bytes for the broker go to the host as IOChunk fd 1."""
    try:
        while data := sock.recv(65536):
            stream.send(pb.IOChunk(fd=1, data=data).encode())
    except (OSError, TtrpcError):
        pass


def _tunnel_in(sock: Any, stream: ServerStream) -> None:
    """The broker's bytes from the host into the guest's end."""
    try:
        while (message := stream.recv()) is not None:
            sock.sendall(pb.IORequest.decode(message).data)
        sock.shutdown(2)
    except (OSError, TtrpcError):
        pass


def _write_stdin(process: Process, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            fd = process.stdin_w
            if fd < 0:
                return
            view = view[os.write(fd, view) :]
    except OSError:
        pass  # the process closed its stdin or exited: the rest has nowhere to go


def _cgroup_dir(container_id: str) -> str:
    return f"/sys/fs/cgroup{GUEST_CGROUPS}/{container_id}"


def _guest_config(config: dict[str, Any], container_id: str) -> dict[str, Any]:
    """The host's OCI config as the guest engine runs it: the VM is the pod's network (Kata drops the network
    namespace too), host namespace paths and hooks mean nothing here, and the cgroup is the guest's."""
    config = dict(config)
    linux = dict(config.get("linux", {}))
    linux["namespaces"] = [ns for ns in linux.get("namespaces", [])
                           if ns.get("type") != "network" and not ns.get("path")]
    linux["cgroupsPath"] = f"{GUEST_CGROUPS}/{container_id}"
    # net.* sysctls are the pod network's, which is the guest's own: _apply_net_sysctls sets them there
    linux["sysctl"] = {k: v for k, v in (linux.get("sysctl") or {}).items() if not k.startswith("net.")}
    config["linux"] = linux
    config.pop("hooks", None)
    # the host's handler choice (io.clave.handler=vm) is not the guest's: in here the Linux handler runs
    config["annotations"] = {k: v for k, v in config.get("annotations", {}).items() if k != HANDLER_ANNOTATION}
    root = config.get("root", {})
    if not os.path.isabs(root.get("path", "")):
        raise TtrpcError(Code.INVALID_ARGUMENT, "oci_json: root.path must be an absolute guest path (a storage's "
                                                "mount_point)")
    return config


def _apply_net_sysctls(config: dict[str, Any]) -> None:
    """The config's net.* sysctls, set in the guest's network namespace (the pod's: Docker and podman set
    net.ipv4.ping_group_range and ip_unprivileged_port_start for every container), as Kata's agent does."""
    for key, value in (config.get("linux", {}).get("sysctl") or {}).items():
        if not key.startswith("net."):
            continue
        path = os.path.join("/proc/sys", *key.split("."))
        if ".." in key.split(".") or not os.path.isfile(path):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"sysctl {key}: no such setting in the guest")
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"sysctl {key}={value}: {exc.strerror}") from None


def _mount_storage(storage: pb.Storage) -> str:
    from clave.linux import sys as lsys
    from clave.linux.rootfs import parse_options

    target = os.path.normpath(storage.mount_point)
    if not target.startswith("/run/"):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"storage mount_point {storage.mount_point!r}: must be below /run")
    if storage.driver == "blk":
        source = _disk_by_serial(storage.source)
    elif storage.driver in ("tmpfs", "virtio-fs", "local"):
        source = storage.source
    else:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"storage driver {storage.driver!r}: blk, virtio-fs or tmpfs")
    flags, _propagation, data = parse_options(list(storage.options))
    os.makedirs(target, exist_ok=True)
    fstype = storage.fstype or ("virtiofs" if storage.driver == "virtio-fs" else "ext4")
    if fstype == "ext4":
        # mkfs -d leaves inode tables unzeroed: a writable mount would start the kernel's lazy-init thread,
        # which writes them out into the container's layer while it starts (emulated CPU and IO it needs)
        data = f"{data},noinit_itable" if data else "noinit_itable"
    try:
        lsys.mount(source, target, fstype, flags, data or None)
    except OSError as exc:
        os.rmdir(target)
        raise TtrpcError(Code.INTERNAL, f"mount {source} on {target} ({fstype}): {exc.strerror}") from None
    return target


def _disk_by_serial(serial: str, timeout: float = 5.0) -> str:
    device = disks.find(serial, timeout)
    if device is None:
        raise TtrpcError(Code.NOT_FOUND, f"no virtio-blk disk with serial {serial!r}")
    return device


def _ip(*args: str, exists_ok: bool = False) -> None:
    """busybox's ip (the guest image has no iproute2); INTERNAL with its message when it fails."""
    import subprocess

    done = subprocess.run([BUSYBOX, "ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip().removeprefix("ip: ") or f"exit status {done.returncode}"
        if exists_ok and "File exists" in message:
            return
        raise TtrpcError(Code.INTERNAL, f"ip {' '.join(args)}: {message}")


def _link_by_mac(mac: str, timeout: float = 5.0) -> str:
    """The guest interface whose MAC is ``mac`` (QEMU gives each NIC its host interface's)."""
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/class/net")):
            try:
                with open(f"/sys/class/net/{name}/address") as f:
                    if f.read().strip().lower() == mac.lower():
                        return name
            except OSError:
                continue
        if time.monotonic() >= deadline:
            raise TtrpcError(Code.NOT_FOUND, f"UpdateInterface: no NIC with MAC address {mac} in the guest")
        time.sleep(0.02)


def _unmount(target: str) -> None:
    from clave.linux import sys as lsys

    try:
        lsys.umount(target, lsys.MNT_DETACH)
        os.rmdir(target)
    except OSError:
        pass


def _stats_message(stats: dict[str, Any]) -> pb.StatsContainerResponse:
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    throttling = cpu.get("throttling") or {}
    memory = stats.get("memory") or {}
    mem_usage = memory.get("usage") or {}
    pids = stats.get("pids") or {}
    cgroup = pb.CgroupStats(
        cpu_stats=pb.CpuStats(
            cpu_usage=pb.CpuUsage(total_usage=usage.get("total", 0), percpu_usage=list(usage.get("percpu", [])),
                                  usage_in_kernelmode=usage.get("kernel", 0), usage_in_usermode=usage.get("user", 0)),
            throttling_data=pb.ThrottlingData(periods=throttling.get("periods", 0),
                                              throttled_periods=throttling.get("throttledPeriods", 0),
                                              throttled_time=throttling.get("throttledTime", 0))),
        memory_stats=pb.MemoryStats(
            cache=memory.get("cache", 0),
            usage=pb.MemoryData(usage=mem_usage.get("usage", 0), max_usage=mem_usage.get("max", 0),
                                failcnt=mem_usage.get("failcnt", 0), limit=mem_usage.get("limit", 0)),
            stats={k: v for k, v in (memory.get("raw") or {}).items() if isinstance(v, int) and v >= 0}),
        pids_stats=pb.PidsStats(current=pids.get("current", 0), limit=pids.get("limit", 0)),
    )
    network = [pb.NetworkStats(name=n.get("name", ""), rx_bytes=n.get("rx_bytes", 0),
                               rx_packets=n.get("rx_packets", 0), rx_errors=n.get("rx_errors", 0),
                               rx_dropped=n.get("rx_dropped", 0), tx_bytes=n.get("tx_bytes", 0),
                               tx_packets=n.get("tx_packets", 0), tx_errors=n.get("tx_errors", 0),
                               tx_dropped=n.get("tx_dropped", 0)) for n in stats.get("network_interfaces", [])]
    return pb.StatsContainerResponse(cgroup_stats=cgroup, network_stats=network, stats_json=json.dumps(stats))


class HealthService:
    def check(self, ctx: Context, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.ServingStatus.SERVING)

    def version(self, ctx: Context, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        return pb.VersionCheckResponse(grpc_version="ttrpc", agent_version=__version__)
