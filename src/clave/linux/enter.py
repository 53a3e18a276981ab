"""Entering a running container: the process choreography behind ``exec``.

runtime (clave exec)
  └─ fork → joiner: placed in the container's cgroup by the runtime, joins the init's namespaces
            (user first, mount last), forks so the new pid namespace applies, reports the pid, exits.
              └─ fork → the process: cwd, console, identity and confinement, execve.

Like the init, the process reports failures over the channel; the runtime sees EOF once it has exec'd.
"""

from __future__ import annotations

import os

from clave.faults import pause_point
from clave.linux import namespaces as ns
from clave.linux import process as proc
from clave.linux import sys as lsys
from clave.linux import trampoline
from clave.linux.channel import Channel, ChannelClosed
from clave.linux.spawn import close_fds_except, kill_and_reap, report_and_exit, set_dumpable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class EnterError(Exception):
    """The process could not be started in the container; one line."""


def namespaces_of(init_pid: int, types: list[str]) -> dict[str, str | None]:
    """The init's namespaces to join, skipping those this process already shares (setns to the same user
    namespace is an error, and joining the others is a no-op)."""
    wanted: dict[str, str | None] = {}
    for ns_type in ns.JOIN_ORDER:
        if ns_type in types:
            path = f"/proc/{init_pid}/ns/{ns.PROC_NAMES[ns_type]}"
            if not ns.same_as_host(ns_type, path):
                wanted[ns_type] = path
    return wanted


def enter(
    init_pid: int,
    namespace_types: list[str],
    process: dict[str, Any],
    join_cgroup: Callable[[int], None],
    console_fd: int | None = None,
    keep_fds: int = 0,
    extra_env: list[str] | None = None,
    stdio: tuple[int, int, int] | None = None,
) -> int:
    """Start ``process`` (an OCI process object, ``_seccomp`` attached when confined) inside the container
    whose init is ``init_pid``; returns its pid once it has exec'd."""
    import clave.linux.capabilities  # noqa: F401  (imported before entering the mount namespace)
    if process.get("rlimits"):
        import clave.linux.rlimits  # noqa: F401
    if process.get("_seccomp"):
        from clave.linux import seccomp

        seccomp.compile_cached(process["_seccomp"])
    if process.get("terminal"):
        import clave.linux.console  # noqa: F401
    wanted = namespaces_of(init_pid, namespace_types)
    joined = ns.open_paths(wanted)
    in_userns = "user" in namespace_types
    parent, child = Channel.pair()
    joiner = os.fork()
    if joiner == 0:
        parent.close()
        _run_joiner(joined, child, process, console_fd, keep_fds, extra_env or [], in_userns, stdio)
    child.close()
    for _, fd in joined:
        os.close(fd)
    pid = 0
    try:
        join_cgroup(joiner)
        parent.send("go")
        msg = parent.recv()
        if msg["t"] == "error":
            raise EnterError(msg["msg"])
        pid = msg["pid"]
        os.waitpid(joiner, 0)
        joiner = 0
        try:
            msg = parent.recv()
        except ChannelClosed:
            failed = trampoline.failure(parent.unread())
            if failed is None:
                return pid  # exec'd: the channel closed on exec
            raise EnterError(f'exec: "{process["args"][0]}": {os.strerror(failed)}') from None
        raise EnterError(msg.get("msg", "exec failed"))
    except ChannelClosed:
        raise EnterError("the process exited before it could be started") from None
    except BaseException:
        for victim in (joiner, pid):
            if victim > 0:
                kill_and_reap(victim)
        raise
    finally:
        parent.close()


def _run_joiner(
    joined: list[tuple[str, int]], chan: Channel, process: dict[str, Any], console_fd: int | None,
    keep_fds: int, extra_env: list[str], in_userns: bool, stdio: tuple[int, int, int] | None,
) -> None:
    try:
        lsys.set_pdeathsig(lsys.SIGKILL)
        set_dumpable(dict.fromkeys(t for t, _ in joined))
        needed = {chan.read_fd, chan.write_fd, *(fd for _, fd in joined)}
        if console_fd is not None:
            needed.add(console_fd)
        close_fds_except(2 + keep_fds, needed, stdio)
        chan.expect("go")
        ns.join(joined)
        pid = os.fork()
        if pid == 0:
            _run_process(chan, process, console_fd, keep_fds, extra_env, in_userns)
        chan.send("pid", pid=pid)
    except BaseException as exc:
        report_and_exit(chan, exc)
    os._exit(0)


def _run_process(
    chan: Channel, process: dict[str, Any], console_fd: int | None, keep_fds: int, extra_env: list[str],
    in_userns: bool,
) -> None:
    try:
        if process.get("terminal"):
            from clave.linux import console

            os.setsid()
            assert console_fd is not None
            console.setup_in_container(console_fd, process.get("consoleSize"))
        cwd = process.get("cwd", "/")
        pause_point("exec-before-cwd")
        proc.enter_cwd(cwd)
        env = proc.environment(process, extra_env)
        path = proc.find_executable(process["args"][0], env, cwd)
        via = proc.exec_trampoline(process.get("_seccomp"))
        proc.finalize(process, in_userns=in_userns)
        proc.mark_fds_cloexec(2 + keep_fds)
        pause_point("exec-before-execve")
        proc.execute(path, process["args"], env, via, chan.write_fd)
    except BaseException as exc:
        report_and_exit(chan, exc)
