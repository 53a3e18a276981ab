"""``containerd-shim-clave-v2``: the shim v2 bootstrap and server.

containerd runs ``containerd-shim-clave-v2 -namespace NS -address ADDR -publish-binary BIN -id ID start`` in
the bundle directory. ``start`` finds or starts the shim that serves this container (one per pod: containers
sharing ``io.kubernetes.cri.sandbox-id`` share a shim), prints only its socket address and exits. A new server is
a fork of ``start`` (one interpreter start-up and no re-import on the path of every ``ctr run``) that keeps
running as a daemon; a server started with its listening socket on fd 3 and no action works too. ``delete``
cleans up after a shim that died, printing a protobuf DeleteResponse. Imports on these paths are kept to the
minimum: every container start and removal pays for them.
"""

from __future__ import annotations

import os
import sys

SOCKET_DIR = "/run/containerd/s"
STATE_ROOT = "/run/containerd/clave"  # the engine's root for the shim's containers, one directory per namespace
SANDBOX_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# The metrics server starts this long after the ttrpc server: a shim that lives shorter (`ctr run --rm` of a
# short command) never pays for it, and a pod's first Create never shares the CPU with it.
METRICS_DELAY = 0.5

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Sequence
    from typing import Any, NoReturn


class Flags:
    def __init__(self) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.debug = False
        self.action = ""


def parse(argv: Sequence[str]) -> Flags:
    flags = Flags()
    names = {"namespace": "namespace", "address": "address", "publish-binary": "publish_binary", "id": "id",
             "bundle": "bundle"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and key in names:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            setattr(flags, names[key], value)
        elif arg.startswith("-") and key in ("debug", "v"):
            flags.debug = True
        elif not arg.startswith("-"):
            flags.action = arg
        else:
            raise SystemExit(f"containerd-shim-clave-v2: unknown flag {arg}")
        i += 1
    if not flags.namespace:
        raise SystemExit("containerd-shim-clave-v2: -namespace is required")
    return flags


def socket_address(containerd_address: str, namespace: str, group_id: str) -> str:
    try:
        from _sha256 import sha256  # CPython's built-in: no OpenSSL to load (hashlib costs about 5 ms)
    except ImportError:
        from hashlib import sha256
    digest = sha256(os.path.join(containerd_address, namespace, group_id).encode()).hexdigest()
    return f"unix://{SOCKET_DIR}/{digest}"


def _group_id(bundle: str, container_id: str) -> str:
    """Containers of one pod share the sandbox's shim."""
    from clave.config.spec import bundle_annotations

    return bundle_annotations(bundle).get(SANDBOX_ANNOTATION) or container_id


def start(flags: Flags) -> int:
    """Print the address of the shim for this container, starting it if needed."""
    import _socket

    bundle = os.getcwd()
    address = socket_address(flags.address, flags.namespace, _group_id(bundle, flags.id))
    path = address[len("unix://"):]
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)  # a live shim for this pod: reuse it
        probe.close()
        _write(os.path.join(bundle, "address"), address)
        sys.stdout.write(address)
        return 0
    except OSError:
        probe.close()
        if os.path.exists(path):
            os.unlink(path)  # a dead shim's socket
    os.makedirs(SOCKET_DIR, mode=0o711, exist_ok=True)
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    log = os.open(os.path.join(bundle, "shim.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _become_server(flags, listener, log)
    os.close(log)
    listener.close()
    _write(os.path.join(bundle, "shim.pid"), str(pid))
    _write(os.path.join(bundle, "address"), address)
    sys.stdout.write(address)
    return 0


def _become_server(flags: Flags, listener: _socket.socket, log: int) -> NoReturn:
    """The forked child of ``start``: a session of its own, stdio on shim.log (containerd reads start's
    output until every copy of it is closed), then serve until Shutdown."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        code = serve(flags, listener)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def serve(flags: Flags, listener: _socket.socket | None = None) -> int:
    """The daemon: serve containerd.task.v2.Task on ``listener`` (default: fd 3) until Shutdown."""
    import _socket
    import threading

    from clave.proto.generated.containerd_task_v2 import TaskService as TaskDescriptor
    from clave.shim.events import Publisher
    from clave.shim.service import TaskService
    from clave.ttrpc import Server

    if listener is None:
        listener = _socket.socket(fileno=3)
    socket_path = listener.getsockname()  # before server.close() closes the listener
    done = threading.Event()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or (flags.address + ".ttrpc" if flags.address else "")
    publisher = Publisher(ttrpc_address, flags.namespace) if ttrpc_address else None
    service = TaskService(flags.namespace, publisher, done.set, log=_shim_log(flags))
    server = Server()
    server.register_service(TaskDescriptor, service)
    server.start(listener)
    metrics = MetricsSlot(threading.Lock())
    timer = threading.Timer(METRICS_DELAY, _serve_metrics, args=(flags, service, metrics))
    timer.daemon = True
    timer.start()
    done.wait()
    timer.cancel()
    metrics.close()
    if publisher is not None:
        publisher.close()
    server.close()
    if isinstance(socket_path, str) and socket_path:
        try:
            os.unlink(socket_path)
        except OSError:
            pass
    return 0


class MetricsSlot:
    """Where the shim's metrics server lands once its thread has bound it; whichever comes first, the server or
    the shim's end, the server is closed (its socket and directory removed) and nothing is left behind."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.server: Any = None
        self.closed = False

    def attach(self, server: Any) -> bool:
        with self.lock:
            if not self.closed:
                self.server = server
            return not self.closed

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.server is not None:
                self.server.close()


def _serve_metrics(flags: Flags, service: Any, slot: MetricsSlot) -> None:
    """Prometheus text on a socket in the shim's state directory, for clave-monitor, from a thread of its own."""
    from clave.shim.prometheus import serve

    serve(flags.namespace, _group_id(flags.bundle or os.getcwd(), flags.id) or f"shim-{os.getpid()}", service, slot)


def _shim_log(flags: Flags) -> Any:
    """The shim's log, as containerd's shims keep one: logrus-style text lines into the bundle's ``log`` fifo,
    which containerd reads into its own log (debug lines only with -debug); stderr (shim.log) without it."""
    from clave.logs import Logger

    fifo = os.path.join(flags.bundle or os.getcwd(), "log")
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # ENXIO: nobody reads it
    except OSError:
        return Logger(None, "text", flags.debug)
    os.set_blocking(fd, True)
    return Logger(None, "text", flags.debug, stream=os.fdopen(fd, "a", buffering=1))


def delete(flags: Flags) -> int:
    """Clean up after a dead shim: force-delete the container and print a DeleteResponse.

    containerd runs this whenever its connection to a shim closes, also after a normal Delete and Shutdown,
    and waits for it: when the engine has no state left for the container, nothing else is imported."""
    from clave.proto.generated.containerd_task_v2 import DeleteResponse
    from clave.proto.generated.google_protobuf import Timestamp

    bundle = flags.bundle or os.getcwd()
    root = f"{STATE_ROOT}/{flags.namespace}"
    pid = 0
    rootfs = os.path.join(bundle, "rootfs")
    handler = None
    if os.path.lexists(os.path.join(root, flags.id)):
        from clave.engine.container import Engine
        from clave.errors import ClaveError

        engine = Engine(root)
        try:
            pid = engine.state(flags.id).get("pid", 0)
            handler = engine.handler(flags.id)
        except ClaveError:
            pass
        try:
            engine.delete(flags.id, force=True)
        except ClaveError:
            pass
    if os.path.ismount(rootfs):
        from clave.handlers import handler_for

        (handler or handler_for({})).detach_rootfs(rootfs)
    if _remove_dead_socket(bundle):  # the shim died: its metrics socket is dead too
        from clave.shim.prometheus import remove_if_dead

        remove_if_dead(flags.namespace, _group_id(bundle, flags.id))
    sys.stdout.buffer.write(DeleteResponse(pid=pid, exit_status=137, exited_at=Timestamp.now()).encode())
    return 0


def _remove_dead_socket(bundle: str) -> bool:
    """Unlink the socket of the shim that served this bundle if nothing listens on it any more (a shim that was
    killed cannot remove it; a live pod shim serving other containers keeps it). True if it found it dead."""
    import _socket

    try:
        with open(os.path.join(bundle, "address")) as f:
            path = f.read().strip().removeprefix("unix://")
    except OSError:
        return False
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return True
    finally:
        probe.close()
    return False


def main(argv: Sequence[str] | None = None) -> None:
    flags = parse(sys.argv[1:] if argv is None else argv)
    if flags.action == "start":
        _exit_now(start(flags))
    if flags.action == "delete":
        _exit_now(delete(flags))
    if flags.action:
        raise SystemExit(f"containerd-shim-clave-v2: unknown action {flags.action!r}")
    sys.exit(serve(flags))


def _exit_now(code: int) -> None:
    """`start` and `delete` exit without the interpreter's finalization (3-5 ms containerd waits for: it reads
    start's output until it closes, and waits for delete), as the clave CLI does (clave.cli.main._exit)."""
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    if atexit._ncallbacks() == 0 and "threading" not in sys.modules:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
