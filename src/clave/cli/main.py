"""``clave``: the runc-compatible command line. Global flags, then one module per verb.

Flags follow runc's (Go) conventions, which callers rely on: ``--flag value``, ``--flag=value`` and the
single-dash ``-flag`` forms; flags end at the first positional argument.
"""

from __future__ import annotations

import sys

from clave.errors import ClaveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

# The verbs, in the order `clave --help` lists them, with their one-line summaries.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("create", "create a container"),
    ("start", "start a created container"),
    ("run", "create and run a container"),
    ("state", "output the state of a container"),
    ("kill", "send a signal to the init (or all processes) of a container"),
    ("delete", "delete a container and its resources"),
    ("list", "list containers"),
    ("spec", "write a new config.json"),
    ("features", "show what clave supports"),
    ("exec", "run a process in a running container"),
    ("ps", "list a container's processes"),
    ("pause", "freeze a container"),
    ("resume", "thaw a paused container"),
    ("update", "change a container's resources"),
    ("events", "stats and OOM events"),
    ("check", "what this host supports"),
    ("enclave", "keygen / sign / measure WebAssembly enclave modules"),
    ("attest", "TEE evidence or an RA-TLS certificate from the best attester here"),
    ("node", "install / uninstall Clave on a Kubernetes node (containerd's runtimes)"),
    ("device-plugin", "advertise enclave resources (WASM enclave slots, SGX EPC) to kubelet"),
    ("vm", "build the VM guest; which acceleration VMs use here"),
)
VERBS = tuple(name for name, _ in COMMANDS)
# flag name -> (kind, aliases); kind is "str", "int" or "bool".
GLOBAL_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "root": ("str", ()),
    "log": ("str", ()),
    "log-format": ("str", ()),
    "debug": ("bool", ()),
    "systemd-cgroup": ("bool", ()),
    "handler": ("str", ()),
    "criu": ("str", ()),
    "rootless": ("str", ()),
    "help": ("bool", ("h",)),
    "version": ("bool", ("v",)),
}

GLOBAL_HELP: tuple[tuple[str, str], ...] = (
    ("--root DIR", "state directory (default /run/clave)"),
    ("--log FILE", "log file (default stderr)"),
    ("--log-format FMT", "text or json"),
    ("--debug", "debug logging"),
    ("--handler NAME", "the handler of new containers: native (default), enclave, vm; annotations still choose"),
    ("--systemd-cgroup", "accepted for runc compatibility (slice:prefix:name cgroupsPath is recognised by its form)"),
    ("--version", "print the version"),
    ("--help", "show this help"),
)


def _table(rows: tuple[tuple[str, str], ...]) -> str:
    width = max(len(name) for name, _ in rows) + 3
    return "".join(f"  {name.ljust(width)}{text}\n" for name, text in rows)


def usage() -> str:
    """`clave --help`: the commands and global options as aligned two-column tables."""
    return (
        "usage: clave [global options] command [command options] [arguments...]\n\n"
        "clave is an OCI runtime for native, enclave and VM containers, compatible with runc.\n\n"
        f"commands:\n{_table(COMMANDS)}\nglobal options:\n{_table(GLOBAL_HELP)}"
    )


def _import(name: str) -> Any:
    """importlib.import_module without importlib (and the warnings module it pulls in: ~0.5 ms a command)."""
    __import__(name)
    return sys.modules[name]


class UsageError(ClaveError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


class Parsed:
    def __init__(self) -> None:
        self.flags: dict[str, Any] = {}
        self.args: list[str] = []


def parse_flags(argv: Sequence[str], spec: dict[str, tuple[str, tuple[str, ...]]], where: str) -> Parsed:
    names: dict[str, tuple[str, str]] = {}
    for name, (kind, aliases) in spec.items():
        names[name] = (name, kind)
        for alias in aliases:
            names[alias] = (name, kind)
    out = Parsed()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.args.extend(argv[i + 1 :])
            break
        if not arg.startswith("-") or arg == "-":
            out.args.extend(argv[i:])
            break
        key, eq, value = arg.lstrip("-").partition("=")
        if key not in names:
            raise UsageError(f"flag provided but not defined: -{key} ({where})")
        name, kind = names[key]
        if kind == "bool":
            out.flags[name] = value.lower() not in ("false", "0") if eq else True
        else:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{key} ({where})")
                value = argv[i]
            if kind == "int":
                try:
                    out.flags[name] = int(value)
                except ValueError:
                    raise UsageError(f"invalid value {value!r} for flag -{key}: must be an integer") from None
            elif kind == "list":
                out.flags.setdefault(name, []).append(value)
            else:
                out.flags[name] = value
        i += 1
    return out


class Globals:
    def __init__(self, root: str, log: Any, debug: bool, systemd_cgroup: bool, handler: str | None = None) -> None:
        self.root = root
        self.log = log
        self.debug = debug
        self.systemd_cgroup = systemd_cgroup
        self.handler = handler  # --handler: Docker's runtimeArgs and podman's runtime options pass it


# Verbs done in milliseconds: a `clave` process running one of them keeps the garbage collector off (its
# collections would walk every object the imports made, ~1.7 M instructions for `state`; these verbs make almost
# no cyclic garbage). Every other verb, and `run` once its container runs, has the collector back (resume_gc).
SHORT_VERBS = frozenset({"create", "start", "state", "kill", "delete", "list", "spec", "features", "ps", "pause",
                         "resume", "update", "run"})
_gc_paused = False
# Verbs that move a process into cgroups: they start the kernel's grace period for that early (see
# clave.linux.cgroups.start_migration_grace_period).
CGROUP_VERBS = frozenset({"create", "run", "exec"})


def main(argv: Sequence[str] | None = None) -> None:
    """The `clave` process: run one verb, then exit at once (see _exit)."""
    global _gc_paused
    import gc

    gc.disable()
    _gc_paused = True
    _exit(run(sys.argv[1:] if argv is None else argv))


def resume_gc() -> None:
    """Turn the collector back on in a `clave` process before a verb may run long. What exists now (modules,
    classes) is frozen first, so later collections do not walk it."""
    global _gc_paused
    if _gc_paused:
        import gc

        gc.freeze()
        gc.enable()
        _gc_paused = False


def _exit(code: int) -> None:
    """Exit with ``code`` without the interpreter's finalization (tearing down every module and object:
    ~5.8 M instructions, 3-5 ms, after the work is done) when nothing depends on it: stdout and stderr are
    flushed first, and a process with other threads or atexit handlers exits the ordinary way."""
    import atexit
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(code)  # the interpreter reports the failed flush at exit, as it always did
    threading = sys.modules.get("threading")
    if type(code) is int and atexit._ncallbacks() == 0 and (threading is None or threading.active_count() <= 1):
        os._exit(code & 0xFF)
    sys.exit(code)


def run(argv: Sequence[str]) -> int:
    from clave.logs import Logger

    log = _early_logger(argv)
    helper = 0
    try:
        parsed = parse_flags(argv, GLOBAL_FLAGS, "global")
        log = Logger(parsed.flags.get("log"), parsed.flags.get("log-format", "text"), parsed.flags.get("debug", False))
        if parsed.flags.get("log-format", "text") not in ("text", "json"):
            raise UsageError(f"invalid log format {parsed.flags['log-format']!r}: use text or json")
        log.touch()
        if parsed.flags.get("version"):
            from clave import __version__
            from clave.engine.state import OCI_VERSION

            print(f"clave version {__version__}\nspec: {OCI_VERSION}\npython: {sys.version.split()[0]}")
            return 0
        if parsed.flags.get("help") or not parsed.args:
            sys.stdout.write(usage())
            return 0 if parsed.flags.get("help") else 1
        verb, rest = parsed.args[0], parsed.args[1:]
        if verb == "help":
            sys.stdout.write(usage())
            return 0
        if verb not in VERBS:
            # runc exits 3 here (its help lookup's status): callers probing for a verb see the same code.
            raise ClaveError(f"unknown command {verb!r}; run 'clave --help' for the list", exit_code=3)
        if verb not in SHORT_VERBS:
            resume_gc()
        if verb in CGROUP_VERBS:
            from clave.linux.cgroups import start_migration_grace_period

            helper = start_migration_grace_period()
        module = _import(f"clave.cli.{verb.replace('-', '_')}")  # device-plugin
        verb_parsed = parse_flags(rest, module.FLAGS, verb)
        if verb_parsed.flags.get("help"):
            print((module.__doc__ or verb).strip())
            return 0
        ctx = Globals(
            root=parsed.flags.get("root") or "/run/clave",
            log=log,
            debug=parsed.flags.get("debug", False),
            systemd_cgroup=parsed.flags.get("systemd-cgroup", False),
            handler=parsed.flags.get("handler") or None,
        )
        code: int = module.run(verb_parsed, ctx)
        return code
    except ClaveError as exc:
        _report(log, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # The last resort: a bug (every refusal of bad input is a ClaveError from the layer that owns that
        # input). One line, as for any error; the traceback goes to the log with --debug.
        if log.threshold <= 10:
            import traceback

            log.debug("".join(traceback.format_exception(exc)))
        _report(log, f"clave: internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if helper:
            _reap(helper)


def _reap(pid: int) -> None:
    """Collect an exited child unless a wait for any child (`run` waiting for its container) already did."""
    import os

    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _early_logger(argv: Sequence[str]) -> Any:
    """A logger from --log/--log-format found before the verb, so even a flag error reaches the log file."""
    from clave.logs import Logger

    found: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        key, eq, value = argv[i].lstrip("-").partition("=")
        takes_value = GLOBAL_FLAGS.get(key, ("bool",))[0] != "bool"
        if takes_value and not eq:
            i += 1
            value = argv[i] if i < len(argv) else ""
        if key in ("log", "log-format"):
            found[key] = value
        i += 1
    return Logger(found.get("log"), found.get("log-format", "text"))


def _report(log: Any, message: str) -> None:
    """One line on stderr, and (when --log names a file) a JSON/text error line in the log. With
    --log-format json and no --log file, the stderr line is that JSON line, as runc writes it."""
    message = " ".join(message.split("\n"))
    if log.to_stderr and log.fmt == "json":
        log.error(message)
        return
    print(message, file=sys.stderr)
    if not log.to_stderr:
        log.error(message)


def need_args(parsed: Parsed, count: int, usage: str, exact: bool = False) -> list[str]:
    """The positional arguments: at least ``count``, or exactly ``count`` (runc's rule for most verbs)."""
    if len(parsed.args) < count:
        raise UsageError(f"missing argument: usage: clave {usage}")
    if exact and len(parsed.args) > count:
        raise UsageError(f"too many arguments: usage: clave {usage}")
    return parsed.args


if __name__ == "__main__":
    main()
