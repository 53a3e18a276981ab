"""The Linux handler: a container is a Linux process tree on this kernel (namespaces, cgroups, rootfs,
confinement), built by clave.linux. Native and enclave containers are both Linux containers; they differ only
in their *launcher*, the last step of the init after start (crun's custom handler, youki's Executor): the
native launcher execs the entrypoint, the enclave launcher drives a PAL or the WebAssembly runtime.

What it keeps in ``state.handler_state``: ``pid_start`` (the init's start time, telling a recycled pid from the
init), ``cgroup_paths`` (recorded before anything is made, so destroy finds it after a crash) and, in an
inherited mount namespace, ``inherited_mounts``. The container's status is derived each time: the init alive
with that start time, the exec fifo present until start, the freezer.
"""

from __future__ import annotations

import os
import time

from clave.errors import ClaveError, InvalidArgument, NotFound, WrongState, os_error_message
from clave.faults import pause_point
from clave.handlers.base import Exit, Handler, Sandbox
from clave.linux.procfs import alive, start_time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from clave.engine.state import State, StateDir
    from clave.handlers.base import CreateOptions, ExecOptions
    from clave.linux.cgroups import CgroupManager
    from clave.linux.spawn import InitPlan

SIGKILL = 9


class Launcher:
    """The handler's part inside a Linux init: fills the plan with its last step (``plan.launch``, run after
    start and never returning) and anything it must do while host paths still resolve (``plan.before_pivot``)."""

    def configure(self, plan: InitPlan, state: State) -> None:
        from clave.linux import spawn

        plan.launch = spawn.native_launch


class LinuxHandler(Handler):
    name = "native"
    launcher = Launcher()

    # -- create and destroy
    def prepare(self, state: State, notice: Callable[[str], None]) -> None:
        from clave.linux.spawn import ignored_lsm

        for message in ignored_lsm(state.config.get("linux", {})):
            notice(message)

    def create(self, state: State, sd: StateDir, opts: CreateOptions, runtime_hooks: Callable[[int], None],
               notice: Callable[[str], None]) -> int:
        from clave.linux import cgroups, spawn

        os.mkfifo(sd.fifo, 0o622)
        os.chown(sd.fifo, *_host_root_ids(state.config))  # the init opens it as the container's root
        try:
            cgroup = cgroups.cgroup_manager(state.config.get("linux", {}).get("cgroupsPath"), state.id)
        except cgroups.CgroupError as exc:
            raise InvalidArgument(f"cgroup: {exc}") from None
        state.handler_state["cgroup_paths"] = cgroup.paths()
        plan = make_plan(state, sd, opts)
        self.launcher.configure(plan, state)
        sd.save(state)  # from here on, destroy (delete --force) finds what to clean after a crash
        pause_point("after-state-dir")

        def make_cgroup() -> None:
            self._apply_cgroup(state, cgroup, notice)
            pause_point("after-cgroup")

        try:
            spawn.check_plan(plan)
            if opts.console_socket:
                from clave.linux import console

                plan.console_fd = console.connect_socket(opts.console_socket)
            try:
                pid = spawn.spawn(plan, make_cgroup, cgroup.add_process, runtime_hooks)
            finally:
                if plan.console_fd is not None:
                    os.close(plan.console_fd)
        except spawn.SpawnError as exc:
            raise ClaveError(str(exc)) from None
        except OSError as exc:
            raise ClaveError(os_error_message(exc)) from None
        except Exception as exc:
            if type(exc).__module__.startswith("clave.") and not isinstance(exc, ClaveError):
                raise ClaveError(str(exc)) from None
            raise
        state.handler_state["pid_start"] = start_time(pid)
        return pid

    def _apply_cgroup(self, state: State, cgroup: CgroupManager, notice: Callable[[str], None]) -> None:
        from clave.config.defaults import device_rules
        from clave.linux import cgroups

        linux = state.config.get("linux", {})
        try:
            cgroup.create()
            resources = dict(linux.get("resources", {}))
            resources["devices"] = device_rules(linux)
            cgroup.set(resources, warn=notice)
        except cgroups.CgroupError as exc:
            raise ClaveError(f"cgroup: {exc}") from None

    def destroy(self, state: State, sd: StateDir, notice: Callable[[str], None]) -> None:
        if state.pid > 0 and self._init_alive(state):
            send_signal(state.pid, SIGKILL)
        remove_cgroup(state.handler_state.get("cgroup_paths"), notice)
        inherited = state.handler_state.get("inherited_mounts")
        if inherited is not None:
            from clave.linux import rootfs

            try:
                rootfs.detach_rootfs(state.rootfs, inherited["rootfs_mount"])
            except rootfs.RootfsError as exc:
                notice(f"{self.name} handler cleanup: {exc}")

    # -- lifecycle
    def start(self, state: State, sd: StateDir) -> None:
        error = _release_init(sd.fifo, state, lambda: self._init_alive(state))
        os.unlink(sd.fifo)
        if error is not None:
            send_signal(state.pid, SIGKILL)
            raise ClaveError(error)

    def status(self, state: State, sd: StateDir) -> str:
        if state.pid <= 0:
            return "creating"
        if not self._init_alive(state):
            return "stopped"
        from clave.linux import freezer  # not the cgroup managers: `clave state` stays light

        if freezer.frozen(state.handler_state.get("cgroup_paths", {})):  # before the fifo: a created container
            return "paused"                                                 # can be paused too (runc's order)
        if os.path.exists(sd.fifo):
            return "created"
        return "running"

    def _init_alive(self, state: State) -> bool:
        return alive(state.pid, state.handler_state.get("pid_start", 0))

    def kill(self, state: State, sig: int, all_processes: bool = False) -> None:
        if all_processes:
            self._cgroup(state).kill_all(sig)
            return
        try:
            os.kill(state.pid, sig)
        except ProcessLookupError:
            raise WrongState(f"container not running: {state.id}") from None

    def wait(self, state: State, pid: int) -> int:
        return reap_until(pid)

    # -- processes
    def exec(self, state: State, sd: StateDir, process: dict[str, Any], opts: ExecOptions) -> int:
        from clave.linux import enter, spawn

        try:
            spawn.check_lsm(process, {})
        except spawn.SpawnError as exc:
            raise InvalidArgument(str(exc)) from None
        linux = state.config.get("linux", {})
        process = dict(process)
        if linux.get("seccomp"):
            process["_seccomp"] = linux["seccomp"]
        types = [n["type"] for n in linux.get("namespaces", [])]
        console_fd = None
        if process.get("terminal"):
            from clave.linux import console

            if not opts.console_socket:
                raise InvalidArgument("cannot allocate tty if clave will detach without setting console socket")
            console_fd = console.connect_socket(opts.console_socket)
        try:
            return enter.enter(state.pid, types, process, self._cgroup(state).add_process, console_fd,
                               opts.preserve_fds, stdio=opts.stdio)
        except enter.EnterError as exc:
            raise ClaveError(str(exc)) from None
        except OSError as exc:
            raise ClaveError(os_error_message(exc)) from None
        finally:
            if console_fd is not None:
                os.close(console_fd)

    def signal_process(self, state: State, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise NotFound(f"process {pid} of container {state.id} already finished") from None

    def pids(self, state: State) -> list[int]:
        return sorted(self._cgroup(state).pids())

    # -- resources
    def pause(self, state: State) -> None:
        self._cgroup(state).freeze()

    def resume(self, state: State) -> None:
        self._cgroup(state).thaw()

    def update(self, state: State, resources: dict[str, Any], notice: Callable[[str], None]) -> None:
        from clave.linux import cgroups

        try:
            self._cgroup(state).set(resources, warn=notice)
        except cgroups.CgroupError as exc:
            raise InvalidArgument(f"cgroup: {exc}") from None

    def stats(self, state: State) -> dict[str, Any]:
        data: dict[str, Any] = self._cgroup(state).stats()
        data["network_interfaces"] = _network_interfaces(state.pid)
        return data

    def stats_format(self) -> str:
        from clave.linux.cgroups import detect_mode

        return "v2" if detect_mode() == "v2" else "v1"

    def oom_count(self, state: State) -> int:
        count: int = self._cgroup(state).oom_kill_count()
        return count

    def _cgroup(self, state: State) -> CgroupManager:
        from clave.linux import cgroups

        return cgroups.CgroupManager.from_paths(state.handler_state.get("cgroup_paths", {}))

    # -- the shim's side
    def attach_rootfs(self, bundle: str, mounts: list[dict[str, Any]]) -> str | None:
        return mount_rootfs(bundle, mounts)

    def detach_rootfs(self, attached: str | None) -> None:
        unmount_rootfs(attached)

    def sandbox(self, sandbox_id: str) -> Sandbox:
        return ReaperSandbox()


class ReaperSandbox(Sandbox):
    """A pod of Linux containers: the shim is their subreaper, and one thread reaps every child. It sleeps in
    waitid(WNOWAIT) until some child has exited, without reaping it, then reaps under ``quiet``: calls that
    wait for children of their own (create's intermediate, hooks) hold ``quiet`` and keep theirs. No signal
    handler is needed, so any thread can start it. With no child at all it waits for the next ``quiet`` call
    to end (children are made only under it)."""

    def __init__(self) -> None:
        super().__init__()
        self._notifying = _NotifyingLock()
        self.quiet = self._notifying

    def start(self, on_exit: Callable[[Exit], None]) -> None:
        import threading

        from clave.linux import sys as lsys

        lsys.set_child_subreaper()
        self._on_exit = on_exit
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                self._notifying.wait_released(1.0)  # no children yet (or between containers)
                continue
            with self.quiet:
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    self._on_exit(Exit(pid, _shell_status(status), time.time_ns()))


class _NotifyingLock:
    """A re-entrant lock that tells a waiter each time it is released."""

    def __init__(self) -> None:
        import _thread

        self._lock = _thread.RLock()
        self._released = _thread.allocate_lock()
        self._released.acquire()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *_: object) -> None:
        self._lock.release()
        if self._released.locked():
            try:
                self._released.release()
            except RuntimeError:
                pass  # released by another thread meanwhile

    def wait_released(self, timeout: float) -> None:
        self._released.acquire(timeout=timeout)


def mount_rootfs(bundle: str, mounts: list[dict[str, Any]]) -> str | None:
    """Mount the rootfs containerd prepared (snapshots) at <bundle>/rootfs; none with ``ctr run --rootfs``."""
    if not mounts:
        return None
    from clave.linux import rootfs as rfs
    from clave.linux import sys as lsys

    target = os.path.join(bundle, "rootfs")
    os.makedirs(target, exist_ok=True)
    for mount in mounts:
        flags, _, data = rfs.parse_options(list(mount.get("options", [])))
        try:
            if mount.get("type") == "bind" or flags & lsys.MS_BIND:
                lsys.mount(mount["source"], target, None, flags | lsys.MS_BIND)
            else:
                lsys.mount(mount["source"], target, mount.get("type"), flags, data or None)
        except OSError as exc:
            raise ClaveError(f"mount rootfs ({mount.get('type')} {mount.get('source')}): {exc}") from None
    return target


def unmount_rootfs(attached: str | None) -> None:
    if not attached or not os.path.ismount(attached):
        return
    from clave.linux import sys as lsys

    try:
        lsys.umount(attached, lsys.MNT_DETACH)
    except OSError:
        pass


def make_plan(state: State, sd: StateDir, opts: CreateOptions) -> InitPlan:
    """The init plan of a Linux container (the launcher then adds its last step)."""
    from clave.config import spec as oci  # not at the top: `clave state` and `start` do not need it
    from clave.linux import spawn

    extra_env = []
    if opts.listen_fds:
        extra_env = [f"LISTEN_FDS={opts.listen_fds}", "LISTEN_PID=1"]
    plan = spawn.InitPlan(
        config=state.config,
        rootfs=state.rootfs,
        state_dir=sd.path,
        namespaces=oci.namespaces(state.config),
        cgroup_paths=state.handler_state.get("cgroup_paths", {}),
        no_pivot=opts.no_pivot,
        keep_fds=opts.listen_fds + opts.preserve_fds,
        extra_env=extra_env,
        bundle=state.bundle,
    )
    plan.stdio = opts.stdio
    if "mount" not in plan.namespaces:
        from clave.linux import rootfs

        # The container's mounts will be the runtime's own: remember what was there, destroy removes the rest.
        state.handler_state["inherited_mounts"] = {"rootfs_mount": rootfs.top_mount_id(state.rootfs)}
    return plan


def reap_until(pid: int) -> int:
    """Reap children until ``pid`` exits; its status (the caller is the subreaper it was re-parented to)."""
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 255
        if reaped == pid:
            return _shell_status(status)


def _shell_status(status: int) -> int:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def remove_cgroup(paths: dict[str, str] | None, notice: Callable[[str], None]) -> None:
    """Kill whatever is left in a container's cgroup and remove it (destroy, after a crash too); what cannot be
    removed is reported through ``notice``."""
    if not paths:
        return
    from clave.linux import cgroups

    cgroup = cgroups.CgroupManager.from_paths(paths)
    try:
        cgroup.kill_all(SIGKILL)
        wait_gone(lambda: bool(cgroup.pids()))
        cgroup.destroy()
    except Exception as exc:  # keep cleaning; report what stayed
        notice(f"cgroup cleanup: {exc}")


def send_signal(pid: int, sig: int) -> None:
    """Signal ``pid`` if it still exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(busy: Callable[[], bool], timeout: float = 5.0) -> None:
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
    from clave.config import spec as oci

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


def _release_init(fifo: str, state: State, alive: Callable[[], bool]) -> str | None:
    """Open the exec fifo so the waiting init proceeds; returns its error message, or None once it exec'd."""
    import select

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
            if not alive():
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
