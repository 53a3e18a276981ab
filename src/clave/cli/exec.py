"""exec: run a new process inside a running container.

usage: clave exec [--process FILE | COMMAND ARGS...] [--tty] [--console-socket SOCK] [--detach] [--pid-file FILE]
                  [--env K=V]... [--cwd DIR] [--user UID[:GID]] [--additional-gids GID]... [--cap CAP]...
                  [--no-new-privs] [--preserve-fds N] [--ignore-paused] ID [COMMAND ARGS...]
Without --detach, waits for the process and exits with its status.
"""

from __future__ import annotations

from clave import fastjson
from clave.cli.main import Parsed, UsageError, need_args
from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "process": ("str", ("p",)),
    "tty": ("bool", ("t",)),
    "console-socket": ("str", ()),
    "detach": ("bool", ("d",)),
    "pid-file": ("str", ()),
    "env": ("list", ("e",)),
    "cwd": ("str", ()),
    "user": ("str", ("u",)),
    "additional-gids": ("list", ("g",)),
    "cap": ("list", ("c",)),
    "no-new-privs": ("bool", ()),
    "preserve-fds": ("int", ()),
    "ignore-paused": ("bool", ()),
    "process-label": ("str", ()),
    "apparmor": ("str", ()),
    "cgroup": ("str", ()),
    "help": ("bool", ("h",)),
}


def build_process(parsed: Parsed, config: dict[str, Any]) -> dict[str, Any]:
    """The process to start: --process FILE as given, or the container's process with the flags applied."""
    flags = parsed.flags
    if flags.get("process"):
        try:
            with open(flags["process"], "rb") as f:
                given = fastjson.loads(f.read())
        except OSError as exc:
            raise ClaveError(f"process file {flags['process']}: {exc.strerror}") from None
        except ValueError as exc:
            raise ClaveError(f"process file {flags['process']}: invalid JSON: {exc}") from None
        return dict(given)  # validated by the engine, naming this file

    args = parsed.args[1:]
    if not args:
        raise UsageError("exec needs a command (after the container id) or --process FILE")
    base = config.get("process", {})
    process: dict[str, Any] = {
        "args": args,
        "env": list(base.get("env", [])) + list(flags.get("env", [])),
        "cwd": flags.get("cwd") or base.get("cwd", "/"),
        "terminal": flags.get("tty", False),
        "user": dict(base.get("user", {})),
    }
    for key in ("capabilities", "rlimits", "noNewPrivileges", "oomScoreAdj", "apparmorProfile", "selinuxLabel"):
        if key in base:
            process[key] = base[key]
    if flags.get("user"):
        uid, _, gid = flags["user"].partition(":")
        process["user"] = {"uid": _number(uid, "--user must be UID[:GID] in numbers", flags["user"]),
                           "gid": _number(gid, "--user must be UID[:GID] in numbers", flags["user"]) if gid else 0}
    if flags.get("additional-gids"):
        process["user"]["additionalGids"] = [_number(g, "--additional-gids must be a number", g)
                                             for g in flags["additional-gids"]]
    if flags.get("cap"):
        caps = {k: list(v) for k, v in process.get("capabilities", {}).items()}
        for cap in flags["cap"]:
            for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"):
                if cap not in caps.setdefault(kind, []):
                    caps[kind].append(cap)
        process["capabilities"] = caps
    if flags.get("no-new-privs"):
        process["noNewPrivileges"] = True
    return process


def _number(text: str, rule: str, given: str) -> int:
    """A numeric id from a flag (its range is checked with the rest of the process, by the engine)."""
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{rule}, got {given!r}") from None


# runc's exec exits 255 when exec itself fails, so a caller tells that from the process's own exit status.
EXEC_FAILED = 255


def run(parsed: Parsed, ctx: Any) -> int:
    args = need_args(parsed, 1, "exec [options] ID COMMAND [ARGS...]")
    from clave.engine.container import Engine

    engine = Engine(ctx.root, ctx.log)
    container_id = args[0]
    try:
        pid, tty, detach = _start(parsed, engine, ctx, container_id)
    except ClaveError as exc:
        exc.exit_code = EXEC_FAILED
        raise
    if detach:
        return 0
    from clave.cli.run import forward_signals

    forward_signals(lambda num: engine.signal_process(container_id, pid, num))
    if tty is not None:
        tty.start_copying()
    status = engine.wait(container_id, pid)
    if tty is not None:
        tty.finish()
    return status


def _start(parsed: Parsed, engine: Any, ctx: Any, container_id: str) -> tuple[int, Any, bool]:
    """Start the process; returns its pid, the console it uses (or None) and whether to detach."""
    from clave.engine import state as st
    from clave.engine.container import ExecOptions
    from clave.linux import sys as lsys

    config = st.StateDir(ctx.root, container_id).load().config  # an unknown container fails first, as in runc
    process = build_process(parsed, config)
    detach = parsed.flags.get("detach", False)
    console_socket = parsed.flags.get("console-socket")
    tty = None
    if process.get("terminal") and not console_socket:
        if detach:
            raise ClaveError("cannot allocate tty if clave will detach without setting console socket")
        from clave.linux.console import ConsoleSocket

        tty = ConsoleSocket()
        console_socket = tty.socket_path
    if not process.get("terminal") and console_socket:
        raise ClaveError("cannot use console socket if clave will not detach or allocate tty")
    preserve = parsed.flags.get("preserve-fds", 0)
    from clave.cli.options import _reserve_fds

    _reserve_fds(3 + preserve)
    if not detach:
        lsys.set_child_subreaper()
    opts = ExecOptions(console_socket, parsed.flags.get("pid-file"), preserve, parsed.flags.get("ignore-paused", False),
                       source=parsed.flags.get("process") or "exec")
    try:
        pid = engine.exec(container_id, process, opts)
        if tty is not None:
            tty.accept()
    finally:
        if tty is not None:
            tty.close_listener()
    return pid, tty, detach
