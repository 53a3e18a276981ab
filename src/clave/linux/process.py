"""The last steps before a container process runs: identity, limits, confinement, fds, execve.

Shared by the container's init and by ``exec``; called in the container's namespaces after pivot_root.
The order follows what runc does: rlimits, drop the bounding set, keep caps across setuid, switch user,
set the remaining capability sets, no_new_privs, seccomp last, then execve.
"""

from __future__ import annotations

import errno
import os
import stat

from clave.linux import rootfs, trampoline
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


def find_executable(name: str, env: dict[str, str], cwd: str = "/") -> str:
    """Resolve args[0] as execvp would, inside the container (relative names from ``cwd``); raise the runc-style
    message if missing. Candidates resolve inside the root only: a magic link (/proc/self/fd/N...) is refused."""
    search = env.get("PATH", DEFAULT_PATH).split(":")
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in search]
    for candidate in candidates:
        path = os.path.join(cwd, candidate)
        kind = _kind_in_root(path)
        if kind == "file" and os.access(path, os.X_OK):
            return path
        if "/" in name:
            if kind is None:
                raise ProcessError(f'exec: "{name}": stat {name}: no such file or directory')
            if kind == "outside":
                raise ProcessError(f'exec: "{name}": resolves outside the container (a magic link); refusing it')
            raise ProcessError(f'exec: "{name}": permission denied')
    raise ProcessError(f'exec: "{name}": executable file not found in $PATH')


def _kind_in_root(path: str) -> str | None:
    """"file", "other", "outside" (only reachable through a magic link) or None (missing), resolved in root."""
    root = rootfs.open_root("/")
    try:
        fd = rootfs.resolve(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return "outside" if exc.errno == errno.ELOOP else "other"
    finally:
        os.close(root)
    try:
        return "file" if stat.S_ISREG(os.fstat(fd).st_mode) else "other"
    finally:
        os.close(fd)


def check_cwd(cwd: str, root: str = "/") -> None:
    """Resolve (creating what is missing, as runc does) the working directory inside ``root``, without entering
    it: create validates it, before pivot_root and a read-only root, while the init still holds the state
    directory."""
    os.close(_open_cwd(cwd, create=True, root=root))


def enter_cwd(cwd: str) -> None:
    """Enter the working directory as resolved inside the root, then prove the kernel agrees that it is inside
    (CVE-2024-21626: a working directory reached through a leaked fd is "unreachable" from the root)."""
    fd = _open_cwd(cwd, create=False)
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)
    try:
        here = os.getcwd()  # fails (ENOENT) when the directory is not reachable from our root
        inside = here.startswith("/") and os.path.samestat(os.stat(here), os.stat("."))
    except OSError:
        inside = False
    if not inside:
        raise ProcessError(f"cwd {cwd!r} is outside the container's root filesystem; refusing to start")


def _open_cwd(cwd: str, create: bool, root: str = "/") -> int:
    root_fd = rootfs.open_root(root)
    try:
        return rootfs.resolve(root_fd, cwd, "dir" if create else "", os.O_DIRECTORY)
    except OSError as exc:
        reason = "it resolves through a magic link" if exc.errno == errno.ELOOP else exc.strerror
        raise ProcessError(f"chdir to cwd ({cwd!r}) set in config.json failed: {reason}") from None
    finally:
        os.close(root_fd)


def write_oom_score_adj(pid: int | str, score: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError as exc:
        raise ProcessError(f"set oomScoreAdj {score}: {exc.strerror}") from None


def mark_fds_cloexec(keep_upto: int) -> None:
    """Everything above fd ``keep_upto`` closes at execve; 3..keep_upto stay open for the process."""
    lsys.cloexec_from(keep_upto + 1)
    for fd in range(3, keep_upto + 1):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass


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
    from clave.linux import capabilities  # preloaded by the caller, before pivot_root or setns

    if caps is not None:
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
    try:
        if caps is not None:
            lsys.prctl(PR_SET_KEEPCAPS, 0)
            capabilities.apply_sets(caps)
        else:
            capabilities.clear_inheritable()
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


def exec_trampoline(seccomp_cfg: dict[str, Any] | None) -> int:
    """The sealed trampoline's fd (see clave.linux.trampoline), made before confinement; -1 where this host
    has none or the container's seccomp filter would refuse its calls (then ``execute`` checks instead)."""
    if not trampoline.available():
        return -1
    fd = trampoline.sealed_fd()
    if seccomp_cfg:
        from clave.linux import seccomp

        calls = [(name, (fd, *args[1:]) if name == "execveat" else args) for name, args in trampoline.SYSCALLS]
        if not seccomp.allows(seccomp_cfg, calls):
            os.close(fd)
            return -1
    return fd


def execute(path: str, args: list[str], env: dict[str, str], via: int = -1, status_fd: int = -1) -> None:
    """execve; only returns by raising ProcessError. ``via`` (exec_trampoline's fd) makes the trampoline exec
    ``path``, reporting a failed execve on ``status_fd``; without one, ``path`` is checked first."""
    reset_signals()
    if via >= 0 and status_fd >= 0:
        os.set_inheritable(status_fd, True)
        try:
            os.execve(via, [str(status_fd), path, *args], env)
        except OSError:
            pass  # the trampoline could not run (a filter we could not judge...): exec directly, after checks
        os.set_inheritable(status_fd, False)
    refuse_runtime_interpreters(path)
    try:
        os.execve(path, args, env)
    except OSError as exc:
        raise ProcessError(f'exec: "{args[0]}": {exc.strerror}') from None


def refuse_runtime_interpreters(path: str, depth: int = 0) -> None:
    """Without the trampoline: refuse a program whose ``#!`` interpreter or ELF interpreter resolves through a
    magic link (/proc/self/exe is this Python). A check before execve, so a concurrent swap can still race it:
    the trampoline is the guarantee, this the fallback."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return  # execve will report it
    interpreter = ""
    if head[:2] == b"#!":
        interpreter = head[2:].split(b"\n", 1)[0].strip().split(b" ", 1)[0].decode(errors="replace")
    elif head[:4] == b"\x7fELF" and head[4:5] == b"\x02":
        interpreter = _elf_interpreter(path, head)
    if not interpreter:
        return
    if _kind_in_root(interpreter) == "outside":
        raise ProcessError(f'exec: "{path}": its interpreter {interpreter} resolves outside the container (a magic '
                           "link); refusing it")
    if depth < 4:
        refuse_runtime_interpreters(interpreter, depth + 1)


def _elf_interpreter(path: str, head: bytes) -> str:
    """PT_INTERP of a 64-bit little-endian ELF file, or ""."""
    import struct

    if head[5:6] != b"\x01" or len(head) < 64:
        return ""
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    try:
        with open(path, "rb") as f:
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", table, i * phentsize)
                if kind == 3:  # PT_INTERP
                    f.seek(offset)
                    return f.read(min(size, 4096)).rstrip(b"\0").decode(errors="replace")
    except (OSError, struct.error):
        pass
    return ""
