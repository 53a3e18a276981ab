"""The last steps before a container process runs: identity, limits, confinement, fds, execve.

Shared by the container's init and by ``exec``; called in the container's namespaces after pivot_root.
The order follows what runc does: rlimits, drop the bounding set, keep caps across setuid, switch user,
set the remaining capability sets, no_new_privs, seccomp last, then execve.
"""

from __future__ import annotations

import os

from clave.linux import sys as lsys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_KEEPCAPS = 8


class ProcessError(Exception):
    """The process cannot be started as configured; one line."""


def environment(process: dict[str, Any], extra: list[str] = ()) -> dict[str, str]:  # type: ignore[assignment]
    env: dict[str, str] = {}
    for pair in list(process.get("env", [])) + list(extra):
        key, _, value = pair.partition("=")
        env[key] = value
    return env


def find_executable(name: str, env: dict[str, str]) -> str:
    """Resolve args[0] as execvp would, inside the container; raise the runc-style message if missing."""
    if "/" in name:
        if not os.path.exists(name):
            raise ProcessError(f'exec: "{name}": stat {name}: no such file or directory')
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise ProcessError(f'exec: "{name}": permission denied')
        return name
    for directory in env.get("PATH", DEFAULT_PATH).split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ProcessError(f'exec: "{name}": executable file not found in $PATH')


def enter_cwd(cwd: str) -> None:
    try:
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
    except OSError as exc:
        raise ProcessError(f"chdir to cwd ({cwd!r}) set in config.json failed: {exc.strerror}") from None


def write_oom_score_adj(pid: int | str, score: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError as exc:
        raise ProcessError(f"set oomScoreAdj {score}: {exc.strerror}") from None


def mark_fds_cloexec(keep_upto: int) -> None:
    """Everything above fd ``keep_upto`` closes at execve; 3..keep_upto stay open for the process."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > keep_upto:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        elif fd > 2:
            os.set_inheritable(fd, True)


def finalize(process: dict[str, Any], in_userns: bool = False) -> None:
    """Apply identity and confinement from ``process`` to the calling process (the future container process)."""
    if process.get("rlimits"):
        from clave.linux import rlimits

        try:
            rlimits.apply(process["rlimits"])
        except rlimits.RlimitError as exc:
            raise ProcessError(str(exc)) from None
    if "oomScoreAdj" in process:
        write_oom_score_adj("self", process["oomScoreAdj"])
    caps = process.get("capabilities")
    seccomp_cfg = process.get("_seccomp")  # the linux.seccomp section, attached by the caller
    no_new_privs = bool(process.get("noNewPrivileges"))
    if caps is not None:
        from clave.linux import capabilities

        try:
            capabilities.drop_bounding(caps.get("bounding", []))
        except capabilities.CapabilityError as exc:
            raise ProcessError(str(exc)) from None
    # Without no_new_privs, loading seccomp needs CAP_SYS_ADMIN: do it while we still have it.
    if seccomp_cfg and not no_new_privs:
        _load_seccomp(seccomp_cfg)
    user = process.get("user", {})
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    if caps is not None:
        lsys.prctl(PR_SET_KEEPCAPS, 1)
    groups = user.get("additionalGids", [])
    set_groups = not in_userns or _setgroups_allowed()
    try:
        if set_groups:
            os.setgroups(groups)
        elif groups:
            raise ProcessError("additionalGids need setgroups, which this user namespace denies")
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise ProcessError(f"set user {uid}:{gid}: {exc.strerror}") from None
    check_identity(uid, gid, groups if set_groups else None)
    if caps is not None:
        lsys.prctl(PR_SET_KEEPCAPS, 0)
        try:
            capabilities.apply_sets(caps)
        except capabilities.CapabilityError as exc:
            raise ProcessError(str(exc)) from None
    if "umask" in user:
        os.umask(user["umask"])
    if no_new_privs:
        lsys.prctl(lsys.PR_SET_NO_NEW_PRIVS, 1)
        if seccomp_cfg:
            _load_seccomp(seccomp_cfg)


def check_identity(uid: int, gid: int, groups: list[int] | None) -> None:
    """Refuse to go on unless this process holds exactly the identity asked for: a value the kernel reads as
    "unchanged" (2^32-1 is -1 to setresuid) must never leave the runtime's root in place."""
    held_uids, held_gids = os.getresuid(), os.getresgid()
    if held_uids != (uid, uid, uid) or held_gids != (gid, gid, gid) or (
        groups is not None and sorted(set(os.getgroups())) != sorted(set(groups))
    ):
        raise ProcessError(f"identity check failed: asked for uid {uid} gid {gid}, the process holds uids "
                           f"{held_uids} gids {held_gids}; refusing to start it")


def _setgroups_allowed() -> bool:
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() == "allow"
    except OSError:
        return True


def _load_seccomp(cfg: dict[str, Any]) -> None:
    from clave.linux import seccomp

    try:
        seccomp.apply(cfg)
    except seccomp.SeccompError as exc:
        raise ProcessError(str(exc)) from None


def reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive execve, so give the container the
    defaults its programs expect (``yes | head`` must end)."""
    import _signal

    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(sig, _signal.SIG_DFL)


def execute(path: str, args: list[str], env: dict[str, str]) -> None:
    """execve; only returns by raising ProcessError."""
    reset_signals()
    try:
        os.execve(path, args, env)
    except OSError as exc:
        raise ProcessError(f'exec: "{args[0]}": {exc.strerror}') from None
