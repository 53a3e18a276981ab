"""Process choreography for a new container, shared by every handler that runs a Linux process tree.

runtime (clave create)
  └─ fork → intermediate: joins namespaces by path, creates a user namespace (the runtime writes its id maps),
            unshares the other new namespaces (not the cgroup one), forks the init and reports its pid, exits.
              └─ fork → init (pid 1 of a new pid namespace): mounts the rootfs while the runtime makes the
                        container's cgroups and moves it into them, then (told "joined") makes its cgroup
                        namespace, creates the devices, asks the runtime to run the prestart/createRuntime hooks,
                        runs createContainer hooks, pivots, reports "ready", then blocks opening the exec fifo
                        until ``start``; then startContainer hooks and the handler's ``launch`` (execve for native
                        containers, the PAL for enclaves).

Moving a process into a cgroup v1 (or hybrid) hierarchy waits for an RCU grace period in the kernel (the
threadgroup lock of cgroup.procs writes, held with the lock every cgroup mkdir takes): 8-20 ms on this
project's machines, runc pays it too. `clave` starts it early (clave.linux.cgroups.start_migration_grace_period)
and the init's mounts (5-8 ms) run during what is left of it; nothing of the container's own runs before the init is
in its cgroups (devices are created, hooks run and the process starts only after "joined"). A cgroup mount waits
for "joined": the container's cgroups exist then, and its cgroup namespace (whose root a cgroup2 mount shows).

Every step is forked Python: no new interpreter starts for the container. The init never returns.
"""

from __future__ import annotations

import os

from clave.faults import pause_point
from clave.linux import hooks as oci_hooks
from clave.linux import namespaces as ns
from clave.linux import process as proc
from clave.linux import rootfs as rfs
from clave.linux import sys as lsys
from clave.linux.channel import Channel, ChannelClosed, ChannelError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Namespaced sysctls and the namespace each needs (runc's validation).
_SYSCTL_NAMESPACES = (
    ("kernel.msgmax", "ipc"), ("kernel.msgmnb", "ipc"), ("kernel.msgmni", "ipc"), ("kernel.sem", "ipc"),
    ("kernel.shmall", "ipc"), ("kernel.shmmax", "ipc"), ("kernel.shmmni", "ipc"),
    ("kernel.shm_rmid_forced", "ipc"), ("fs.mqueue.", "ipc"), ("net.", "network"),
    ("kernel.hostname", "uts"), ("kernel.domainname", "uts"),
)


class SpawnError(Exception):
    """The container could not be created; one line from whichever process failed."""


class InitPlan:
    """Everything the init needs, decided by the runtime before forking."""

    def __init__(
        self, config: dict[str, Any], rootfs: str, state_dir: str, namespaces: dict[str, str | None],
        cgroup_paths: dict[str, str] | None = None, no_pivot: bool = False, keep_fds: int = 0,
        extra_env: list[str] | None = None, launch: Callable[[InitPlan, dict[str, Any]], None] | None = None,
        bundle: str = "", before_pivot: Callable[[InitPlan], None] | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle  # for the state hooks get
        self.rootfs = rootfs
        self.state_dir = state_dir
        # Opened by the runtime: the init may lack the rights to resolve the path (user namespaces).
        self.state_dir_fd = -1
        self.namespaces = namespaces
        self.cgroup_paths = cgroup_paths or {}
        self.no_pivot = no_pivot
        self.console_fd: int | None = None
        self.stdio: tuple[int, int, int] | None = None  # the container's stdio, when not the runtime's own
        self.keep_fds = keep_fds  # fds 3 .. 3+keep_fds-1 go to the process (LISTEN_FDS + --preserve-fds)
        self.extra_env = extra_env or []
        # The handler's last step, run in the init after start; never returns.
        self.launch = launch
        # The handler's preparation in the init while host paths still resolve (load an enclave runtime...).
        self.before_pivot = before_pivot
        self.handler_state: Any = None  # what before_pivot leaves for launch
        self.host_pid = 0

    @property
    def process(self) -> dict[str, Any]:
        return self.config.get("process", {})

    @property
    def linux(self) -> dict[str, Any]:
        return self.config.get("linux", {})

    def new(self, ns_type: str) -> bool:
        return ns_type in self.namespaces and self.namespaces[ns_type] is None


def check_plan(plan: InitPlan) -> None:
    """Reject configurations that cannot work before anything is created."""
    if plan.config.get("hostname") and "uts" not in plan.namespaces:
        raise SpawnError("unable to set hostname without a private UTS namespace")
    if plan.config.get("domainname") and "uts" not in plan.namespaces:
        raise SpawnError("unable to set domainname without a private UTS namespace")
    for key in plan.linux.get("sysctl", {}):
        for prefix, needed in _SYSCTL_NAMESPACES:
            if (key == prefix or (prefix.endswith(".") and key.startswith(prefix))) and needed not in plan.namespaces:
                raise SpawnError(f"sysctl {key!r} is not allowed: the container has no private {needed} namespace")
        if not any(key == p or (p.endswith(".") and key.startswith(p)) for p, _ in _SYSCTL_NAMESPACES):
            raise SpawnError(f"sysctl {key!r} is not in a namespace the container owns; refusing to set it host-wide")
    check_lsm(plan.process, plan.linux)
    if not os.path.isdir(plan.rootfs):
        raise SpawnError(f"rootfs {plan.rootfs} does not exist or is not a directory")


def check_lsm(process: dict[str, Any], linux: dict[str, Any]) -> None:
    """AppArmor profiles and process SELinux labels are refused on hosts without that LSM (runc and crun refuse
    them too), never silently ignored. linux.mountLabel without SELinux is left out (see ignored_lsm)."""
    if process.get("apparmorProfile") and not os.path.isdir("/sys/kernel/security/apparmor"):
        raise SpawnError(f"apparmor profile {process['apparmorProfile']!r} requested, but AppArmor is not enabled "
                         "on this host")
    selinux = os.path.isdir("/sys/fs/selinux")
    if process.get("selinuxLabel") and not selinux:
        raise SpawnError(f"process.selinuxLabel {process['selinuxLabel']!r} requested, but SELinux is not enabled "
                         "on this host")
    if process.get("apparmorProfile") or process.get("selinuxLabel") or (selinux and linux.get("mountLabel")):
        raise SpawnError("AppArmor/SELinux labels are not supported by clave yet")


def ignored_lsm(linux: dict[str, Any]) -> list[str]:
    """Warnings for LSM settings that mean nothing on this host and are ignored, as crun ignores them: a mount
    label without SELinux (no file system takes a context= option then)."""
    if linux.get("mountLabel") and not os.path.isdir("/sys/fs/selinux"):
        return [f"linux.mountLabel {linux['mountLabel']!r} ignored: SELinux is not enabled on this host"]
    return []


def preload(plan: InitPlan) -> None:
    """Import, before forking, every module the init will need: after pivot_root the package's files are out
    of reach. Only what this config uses is imported, so a plain container pays for nothing else."""
    process = plan.process
    if process.get("rlimits"):
        import clave.linux.rlimits  # noqa: F401
    import clave.linux.capabilities  # noqa: F401  (without a capabilities section it empties the inheritable set)
    if plan.linux.get("seccomp"):
        from clave.linux import seccomp

        seccomp.compile_cached(plan.linux["seccomp"])  # compiled once, in the runtime
    if process.get("terminal"):
        import clave.linux.console  # noqa: F401
    if plan.linux.get("personality"):
        import clave.linux.procattrs  # noqa: F401
    hooks = plan.config.get("hooks", {})
    if hooks.get("startContainer") or hooks.get("createContainer"):
        import subprocess  # noqa: F401


def spawn(
    plan: InitPlan,
    make_cgroup: Callable[[], None],
    join_cgroup: Callable[[int], None],
    runtime_hooks: Callable[[int], None],
) -> int:
    """Fork the container's init as described above; returns its pid once it is ready for ``start``.

    ``make_cgroup()`` makes the container's cgroups while the intermediate unshares and forks the init (the
    two overlap, and so does what is left of the kernel's grace period: clave.linux.cgroups); ``join_cgroup(pid)``
    moves the init into them while it mounts; ``runtime_hooks(init_pid)`` runs the prestart and createRuntime
    hooks when the init reaches that point. On failure the init is killed and the error raised (SpawnError,
    or what ``make_cgroup`` raised); the caller removes cgroup and state.
    """
    preload(plan)
    joined = ns.open_paths(plan.namespaces)
    plan.state_dir_fd = os.open(plan.state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    parent, child = Channel.pair()
    intermediate = os.fork()
    if intermediate == 0:
        parent.close()
        _run_intermediate(plan, joined, child)  # never returns
    child.close()
    for _, fd in joined:
        os.close(fd)
    os.close(plan.state_dir_fd)
    init_pid = 0
    try:
        parent.send("go")
        failed: BaseException | None = None
        try:
            make_cgroup()
        except BaseException as exc:
            failed = exc  # raised once the intermediate has reported the init's pid, so both are killed
        msg = parent.recv()
        if msg["t"] == "userns":
            ns.write_id_maps(intermediate, plan.linux.get("uidMappings", []), plan.linux.get("gidMappings", []))
            parent.send("mapped")
            msg = parent.recv()
        if msg["t"] == "error":
            raise SpawnError(msg["msg"])
        if msg["t"] != "pid":
            raise SpawnError(f"container init: protocol error ({msg['t']} before its pid)")
        init_pid = msg["pid"]
        os.waitpid(intermediate, 0)
        intermediate = 0
        if failed is not None:
            raise failed
        _join(parent, join_cgroup, init_pid)  # the init mounts its rootfs meanwhile
        try:
            parent.send("joined")
        except BrokenPipeError:
            pass  # the init failed meanwhile: its message is read next
        pause_point("after-fork")
        msg = parent.recv()
        if msg["t"] == "hooks":
            try:
                runtime_hooks(init_pid)
            except Exception as exc:
                parent.send("abort")
                raise SpawnError(str(exc)) from None
            parent.send("continue")
            msg = parent.recv()
        pause_point("after-hooks")
        if msg["t"] == "error":
            raise SpawnError(msg["msg"])
        if msg["t"] != "ready":
            raise SpawnError(f"container init: protocol error ({msg['t']})")
        return init_pid
    except ChannelClosed:
        raise SpawnError("container init exited unexpectedly during create") from None
    except BaseException:
        for pid in (intermediate, init_pid):
            if pid > 0:
                kill_and_reap(pid)
        raise
    finally:
        parent.close()


def _join(parent: Channel, join_cgroup: Callable[[int], None], init_pid: int) -> None:
    """Move the init into the container's cgroups. If that fails, the init may have failed first (it was
    mounting meanwhile): its own message is the better one."""
    try:
        join_cgroup(init_pid)
    except BaseException:
        kill_and_reap(init_pid)  # its end of the channel closes: what it said before is still there
        try:
            msg = parent.recv()
        except ChannelClosed:
            msg = {"t": ""}
        if msg["t"] == "error":
            raise SpawnError(msg["msg"]) from None
        raise


def kill_and_reap(pid: int) -> None:
    """SIGKILL a process we forked and reap it if it is (still) our child."""
    try:
        os.kill(pid, lsys.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # not our child (the init belongs to the intermediate until it exits)


def report_and_exit(chan: Channel, exc: BaseException) -> None:
    try:
        if isinstance(exc, OSError) and exc.strerror:  # no "[Errno N]" prefix: the message is for people
            msg = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        else:
            msg = str(exc) if isinstance(exc, _EXPECTED) else f"{type(exc).__name__}: {exc}"
        chan.send("error", msg=msg or type(exc).__name__)
    finally:
        os._exit(1)


def _run_intermediate(plan: InitPlan, joined: list[tuple[str, int]], chan: Channel) -> None:
    try:
        lsys.set_pdeathsig(lsys.SIGKILL)  # the runtime died: do not linger half-made
        set_dumpable(plan.namespaces)
        # Drop every descriptor the runtime had open (its state-dir lock above all): the container must not
        # hold them. What stays: stdio, the fds handed to the process, and what the choreography needs.
        needed = {chan.read_fd, chan.write_fd, plan.state_dir_fd, *(fd for _, fd in joined)}
        if plan.console_fd is not None:
            needed.add(plan.console_fd)
        close_fds_except(2 + plan.keep_fds, needed, plan.stdio)
        chan.expect("go")
        if plan.bundle:
            # Relative bind-mount sources are relative to the bundle (config.md). Entered while still
            # privileged: a user namespace's root may not be allowed to walk the path; the init inherits it.
            os.chdir(plan.bundle)
        ns.join(joined)
        in_userns = "user" in plan.namespaces
        if plan.new("user"):
            lsys.unshare(lsys.CLONE_NEWUSER)
            chan.send("userns")
            chan.expect("mapped")
        if in_userns:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        flags = ns.new_flags(plan.namespaces, exclude=("user", "cgroup"))  # cgroup: by the init, once joined
        if flags:
            lsys.unshare(flags)
        # The init shares the channel: it must not speak before its pid is reported, or a busy machine can
        # deliver its "ready" first. It waits for EOF on this pipe, which the intermediate closes after "pid".
        pid_sent_r, pid_sent_w = os.pipe()
        init = os.fork()
        if init == 0:
            os.close(pid_sent_w)
            os.read(pid_sent_r, 1)
            os.close(pid_sent_r)
            _run_init(plan, chan)  # never returns
        os.close(pid_sent_r)
        chan.send("pid", pid=init)
        os.close(pid_sent_w)
    except BaseException as exc:
        report_and_exit(chan, exc)
    os._exit(0)


def close_fds_except(keep_upto: int, needed: set[int], stdio: tuple[int, int, int] | None = None) -> None:
    """Close every fd above ``keep_upto`` that is not ``needed`` (close_range over the gaps: no /proc needed);
    first make ``stdio`` (fds an in-process caller such as the shim chose for the container) our 0, 1 and 2."""
    if stdio is not None:
        adopt_stdio(stdio)
    low = keep_upto + 1
    for fd in sorted(n for n in needed if n >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _MAX_FD)


_MAX_FD = 0x7FFFFFFF


def adopt_stdio(stdio: tuple[int, int, int]) -> None:
    """Make ``stdio`` (fds an in-process caller such as the shim chose) this process's 0, 1 and 2."""
    moved = [os.dup(fd) for fd in stdio]  # dup first: a chosen fd may itself be 0, 1 or 2
    for target, fd in enumerate(moved):
        os.dup2(fd, target)


def set_dumpable(plan_namespaces: dict[str, str | None]) -> None:
    """Make the process joining or building a container non-dumpable (CVE-2016-9962): until it execs, no
    container process can ptrace it or open /proc/<pid>/fd, mem or environ. In a user namespace it stays
    dumpable: its own /proc files would belong to the host's root, out of its reach, and the capability check
    on ptrace already keeps the container's (lesser) processes out."""
    if "user" not in plan_namespaces:
        lsys.prctl(lsys.PR_SET_DUMPABLE, 0)


def _run_init(plan: InitPlan, chan: Channel) -> None:
    try:
        _setup_container(plan, chan)
        exec_fifo = _wait_for_start(plan)
    except BaseException as exc:
        report_and_exit(chan, exc)
    # From here the creating runtime is gone: failures go to the exec fifo, which ``start`` reads.
    try:
        chan.close()
        if plan.launch is native_launch:
            # Nothing but stdio, the fds handed to the process and the fifo stays open from here to execve.
            close_fds_except(2 + plan.keep_fds, {exec_fifo})
        # The state directory's fd is closed now: only then is the working directory entered (CVE-2024-21626).
        pause_point("before-cwd")
        proc.enter_cwd(plan.process.get("cwd", "/"))
        start_hooks = plan.config.get("hooks", {}).get("startContainer", [])
        oci_hooks.run_hooks("startContainer", start_hooks, _hook_state(plan, "created"))
        assert plan.launch is not None
        plan.launch(plan, {"exec_fifo": exec_fifo})
        raise SpawnError("container launch returned")
    except BaseException as exc:
        try:
            os.write(exec_fifo, b"E" + str(exc).encode(errors="replace"))
        finally:
            os._exit(1)


def _hook_state(plan: InitPlan, status: str) -> dict[str, Any]:
    """The state the init's own hooks get on stdin (the init is the container's pid 1 on the host side too)."""
    return {
        "ociVersion": plan.config.get("ociVersion"), "id": os.path.basename(plan.state_dir), "status": status,
        "pid": plan.host_pid, "bundle": plan.bundle, "annotations": plan.config.get("annotations", {}),
    }


def _setup_container(plan: InitPlan, chan: Channel) -> None:
    # Our pid as the runtime sees it (hooks get it): the host's /proc still answers before pivot_root.
    plan.host_pid = int(os.readlink("/proc/self"))
    config = plan.config
    linux = plan.linux
    in_userns = "user" in plan.namespaces
    if plan.process.get("terminal"):
        os.setsid()
    # No mount namespace listed: the runtime's is inherited (config-linux.md) and the rootfs is built in it.
    own_mounts = "mount" in plan.namespaces
    rfs.prepare_propagation(plan.rootfs, linux.get("rootfsPropagation"), own_namespace=own_mounts)
    mounts = config.get("mounts", [])
    joined = False

    def join() -> None:
        nonlocal joined
        if not joined:
            _joined(plan, chan)
            joined = True

    rfs.mount_all(plan.rootfs, mounts, plan.cgroup_paths, in_userns, before_cgroup=join)
    join()
    dev_is_bind = any(
        m["destination"].rstrip("/") == "/dev" and ("bind" in m.get("options", []) or m.get("type") == "bind")
        for m in mounts
    )
    if not dev_is_bind:
        rfs.create_devices(plan.rootfs, linux.get("devices", []), in_userns)
    hooks = config.get("hooks", {})
    if hooks.get("prestart") or hooks.get("createRuntime"):
        chan.send("hooks")
        if chan.recv()["t"] != "continue":
            os._exit(1)
    oci_hooks.run_hooks("createContainer", hooks.get("createContainer", []), _hook_state(plan, "creating"))
    for key, value in linux.get("sysctl", {}).items():
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as exc:
            raise SpawnError(f"sysctl {key}={value}: {exc.strerror}") from None
    if plan.before_pivot is not None:
        plan.before_pivot(plan)
    # Validated (and created if missing) now, entered only after start, once the state directory's fd is closed.
    proc.check_cwd(plan.process.get("cwd", "/"), plan.rootfs)
    rfs.readonly_paths(plan.rootfs, linux.get("readonlyPaths", []))
    rfs.mask_paths(plan.rootfs, linux.get("maskedPaths", []))
    if not own_mounts:
        rfs.chroot_root(plan.rootfs)
    elif plan.no_pivot:
        rfs.move_root(plan.rootfs)
    else:
        rfs.pivot_root(plan.rootfs)
    rfs.finish_propagation(linux.get("rootfsPropagation"))
    if config.get("root", {}).get("readonly"):
        rfs.readonly_root()
    if config.get("hostname"):
        lsys.sethostname(config["hostname"])
    if config.get("domainname"):
        lsys.setdomainname(config["domainname"])
    if plan.process.get("terminal"):
        from clave.linux import console

        assert plan.console_fd is not None
        console.setup_in_container(plan.console_fd, plan.process.get("consoleSize"))
        plan.console_fd = None
    process = plan.process
    cwd = process.get("cwd", "/")
    if plan.launch is native_launch:
        env = proc.environment(process, plan.extra_env)
        process["_exec_path"] = proc.find_executable(process["args"][0], env, cwd)
    if process.get("rlimits"):  # before "ready", as runc does: a limit that cannot be set fails create
        from clave.linux import rlimits

        try:
            rlimits.apply(process["rlimits"])
        except rlimits.RlimitError as exc:
            raise SpawnError(str(exc)) from None
    # Past "ready" nobody hears the init's errors until start: check now that it can open the exec fifo.
    if not os.access("exec.fifo", os.W_OK, dir_fd=plan.state_dir_fd):
        raise SpawnError("exec fifo: the container's root cannot open it for writing")
    chan.send("ready")


def _joined(plan: InitPlan, chan: Channel) -> None:
    """Wait until the runtime has moved this process into the container's cgroups; then the new cgroup
    namespace (its root is the cgroup a process is in when it makes one)."""
    chan.expect("joined")
    if plan.new("cgroup"):
        lsys.unshare(lsys.CLONE_NEWCGROUP)


def _wait_for_start(plan: InitPlan) -> int:
    """Block until ``clave start`` opens the exec fifo; returns the fifo's write fd."""
    fd = os.open("exec.fifo", os.O_WRONLY | os.O_CLOEXEC, dir_fd=plan.state_dir_fd)
    os.close(plan.state_dir_fd)
    return fd


def native_launch(plan: InitPlan, ctx: dict[str, Any]) -> None:
    """The native handler's last step: confine the process and execve the entrypoint."""
    process = dict(plan.process)
    if plan.linux.get("seccomp"):
        process["_seccomp"] = plan.linux["seccomp"]
    env = proc.environment(process, plan.extra_env)
    via = proc.exec_trampoline(process.get("_seccomp"))
    proc.finalize(process, in_userns="user" in plan.namespaces)
    if plan.linux.get("personality"):
        from clave.linux import procattrs

        # Last: seccomp and capset look up syscall numbers by uname's machine, which LINUX32 changes.
        procattrs.personality(plan.linux["personality"])
    proc.mark_fds_cloexec(2 + plan.keep_fds)
    os.write(ctx["exec_fifo"], b"0")
    pause_point("before-execve")
    proc.execute(process["_exec_path"], process["args"], env, via, ctx["exec_fifo"])


_EXPECTED = (
    SpawnError, ChannelError, ns.NamespaceError, rfs.RootfsError, proc.ProcessError, oci_hooks.HookError, OSError,
)
