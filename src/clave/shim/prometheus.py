"""The shim's Prometheus endpoint: text exposition over HTTP/1.1 on a unix socket in the shim's state directory
(``/run/containerd/clave/.shims/<namespace>/<pod>/metrics.sock``, as Kata's shim serves ``shim-monitor.sock``),
which ``clave-monitor`` gathers for the whole node.

Every figure comes from the engine, the one mechanism containerd's Stats uses too: ``Engine.stats`` (runc's
``events --stats`` data from the handler), ``Engine.state`` (the handler's ``describe``: an enclave's type, a VM's
boot time and its VMM's memory), the attestation and KBS counters ``Engine._request`` keeps in the container's state
directory (``clave.engine.counters``), and the enclave starts and refusals this shim saw (``EnclaveLedger``: a
refused container leaves no state behind to ask). Nothing here reads cgroups itself.

The server is a thread of the shim's serving process, started half a second after the ttrpc server (the first
Create never waits for it; clave.shim.main), with no ``http.server``: one request per connection, a few lines of
HTTP.
"""

from __future__ import annotations

import _socket
import _thread
import os
import sys
import time

from clave.errors import ClaveError
from clave.shim.main import STATE_ROOT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

# containerd namespaces cannot begin with a dot: no engine root (STATE_ROOT/<namespace>) is ever this directory.
SHIMS_DIR = f"{STATE_ROOT}/.shims"
SOCKET_NAME = "metrics.sock"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SUN_PATH_MAX = 107  # sockaddr_un's 108 bytes, NUL included

# The CRI annotations containerd (1.6 and later) puts in every pod container's OCI spec.
POD_ANNOTATIONS = (("pod", "io.kubernetes.cri.sandbox-name"), ("namespace", "io.kubernetes.cri.sandbox-namespace"),
                   ("uid", "io.kubernetes.cri.sandbox-uid"))
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"

# name -> (type, help). The order is the exposition's.
FAMILIES: dict[str, tuple[str, str]] = {
    "clave_container_info": ("gauge", "A container this shim serves (1), with its status."),
    "clave_container_cpu_usage_seconds_total": ("counter", "CPU time used by the container's processes."),
    "clave_container_memory_usage_bytes": ("gauge", "Memory charged to the container, page cache included."),
    "clave_container_memory_working_set_bytes": (
        "gauge", "Memory usage less inactive file pages (what the kubelet evicts by)."),
    "clave_container_pids": ("gauge", "Processes (tasks) in the container."),
    "clave_container_network_receive_bytes_total": (
        "counter", "Bytes received on each interface of the container's network namespace (lo left out)."),
    "clave_container_network_transmit_bytes_total": (
        "counter", "Bytes sent on each interface of the container's network namespace (lo left out)."),
    "clave_container_blkio_read_bytes_total": ("counter", "Bytes read from block devices."),
    "clave_container_blkio_write_bytes_total": ("counter", "Bytes written to block devices."),
    "clave_container_oom_events_total": ("counter", "Processes of the container killed by the OOM killer."),
    "clave_enclave_info": ("gauge", "An enclave container (1): its enclave type and whether no hardware protects it."),
    "clave_enclave_starts_total": ("counter", "Enclave containers of the pod this shim started."),
    "clave_enclave_refusals_total": (
        "counter", "Enclave containers of the pod refused at create or start, by phase and error class."),
    "clave_enclave_attestation_requests_total": (
        "counter", "Evidence requests answered by the container's enclave runtime (clave attest ID, clave-relay)."),
    "clave_enclave_attestation_verdicts_total": (
        "counter", "A key broker's verdicts on the container's evidence (accepted: a secret was released)."),
    "clave_enclave_kbs_fetches_total": (
        "counter", "Secrets fetched from a KBS by the container's enclave runtime, at start or on request."),
    "clave_vm_boot_seconds": ("gauge", "Time the container's VM took to boot (or to be restored) to its agent."),
    "clave_vm_vmm_memory_bytes": ("gauge", "Resident memory of the VM's VMM process."),
    "clave_shim_collect_seconds": ("gauge", "Time this shim took to collect the figures of this exposition."),
}


def shim_directory(namespace: str, group_id: str) -> str:
    """The state directory of the shim serving pod (or lone container) ``group_id`` in ``namespace``."""
    return os.path.join(SHIMS_DIR, namespace, group_id)


def unix_address(path: str) -> tuple[str, int | None]:
    """An address for bind/connect: the path itself, or for a path too long for sockaddr_un (a pod's 64-digit
    id makes one) the socket's name under /proc/self/fd/N of its directory; close N after the call."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


# ----------------------------------------------------------------------------------------------- exposition
def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(labels: Iterable[tuple[str, str]]) -> str:
    """``k="v",k2="v2"`` (no braces: callers append more labels)."""
    return ",".join(f'{k}="{escape(v)}"' for k, v in labels)


def number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class Exposition:
    """Samples grouped by family, written in FAMILIES' order with one HELP and TYPE line each."""

    def __init__(self) -> None:
        self.samples: dict[str, list[str]] = {}

    def add(self, family: str, labels: str, value: float) -> None:
        self.samples.setdefault(family, []).append(f"{family}{{{labels}}} {number(value)}\n")

    def text(self) -> bytes:
        out = []
        for family, (kind, help_text) in FAMILIES.items():
            lines = self.samples.get(family)
            if lines:
                out.append(f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n")
                out.extend(lines)
        return "".join(out).encode()


def pod_labels(annotations: dict[str, Any]) -> list[tuple[str, str]]:
    return [(label, str(annotations.get(key, ""))) for label, key in POD_ANNOTATIONS]


def container_labels(container_id: str, annotations: dict[str, Any], handler: str) -> str:
    return label_text([("container_id", container_id), ("container", str(annotations.get(CONTAINER_NAME_ANNOTATION,
                                                                                          ""))),
                       *pod_labels(annotations), ("handler", handler)])


def add_stats(out: Exposition, labels: str, stats: dict[str, Any]) -> None:
    """The required container families from runc-style statistics (the engine's ``stats``)."""
    cpu = stats.get("cpu") or {}
    total = (cpu.get("usage") or {}).get("total")
    if total is not None:
        out.add("clave_container_cpu_usage_seconds_total", labels, total / 1e9)
    memory = stats.get("memory") or {}
    usage = (memory.get("usage") or {}).get("usage")
    if usage is not None:
        raw = memory.get("raw") or {}
        inactive = raw.get("total_inactive_file", raw.get("inactive_file", 0))  # v1 hierarchical, else v2
        out.add("clave_container_memory_usage_bytes", labels, usage)
        out.add("clave_container_memory_working_set_bytes", labels, max(usage - inactive, 0))
    pids = stats.get("pids")
    if pids:
        out.add("clave_container_pids", labels, pids.get("current", 0))
    for iface in stats.get("network_interfaces") or []:
        if iface.get("name") == "lo":
            continue  # as cAdvisor: loopback traffic is no network I/O of the pod
        with_iface = f'{labels},interface="{escape(iface["name"])}"'
        out.add("clave_container_network_receive_bytes_total", with_iface, iface.get("rx_bytes", 0))
        out.add("clave_container_network_transmit_bytes_total", with_iface, iface.get("tx_bytes", 0))
    blkio = stats.get("blkio")
    if blkio is not None:
        read = write = 0
        for entry in blkio.get("ioServiceBytesRecursive") or []:
            op = entry.get("op", "").lower()
            if op == "read":
                read += entry.get("value", 0)
            elif op == "write":
                write += entry.get("value", 0)
        out.add("clave_container_blkio_read_bytes_total", labels, read)
        out.add("clave_container_blkio_write_bytes_total", labels, write)


# ---------------------------------------------------------------------------------------------- enclaves
def error_reason(exc: BaseException) -> str:
    """The class of a refusal as a label value (InvalidArgument -> invalid_argument; ClaveError -> error)."""
    name = type(exc).__name__
    if name == "ClaveError" or not isinstance(exc, ClaveError):
        return "error"
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class EnclaveLedger:
    """What the shim saw of its enclave containers: starts and refusals per pod (a container refused at create
    leaves no state to ask later), and the KBS resources each start provisioned (a start returns only once the
    init has fetched every one of them, before the app runs). Made with the pod's first enclave container."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.noted: dict[str, tuple[tuple[tuple[str, str], ...], str, int]] = {}  # id -> (pod labels, type, kbs)
        self.starts: dict[tuple[tuple[tuple[str, str], ...], str], int] = {}
        self.refusals: dict[tuple[tuple[tuple[str, str], ...], str, str, str], int] = {}
        self.kbs_at_start: dict[str, int] = {}

    def note(self, container_id: str, config: dict[str, Any]) -> None:
        """Before create: the container's pod, enclave type and KBS resources, from its config (not changed)."""
        from clave.enclave import config as enclave_config

        annotations = config.get("annotations") or {}
        view = {"process": {"env": list((config.get("process") or {}).get("env") or [])},
                "annotations": annotations}
        try:
            settings = enclave_config.extract(view)  # extract() edits the env it is given: a copy
        except enclave_config.EnclaveConfigError:
            settings = {"type": str(annotations.get("enclave.type") or "unknown")}
        resources = [r for r in (settings.get("kbs_resources") or "").split(",") if r.strip()]
        with self.lock:
            self.noted[container_id] = (tuple(pod_labels(annotations)), settings.get("type", "unknown"),
                                        len(resources) if settings.get("kbs_url") else 0)

    def refused(self, container_id: str, phase: str, exc: BaseException) -> None:
        with self.lock:
            noted = self.noted.pop(container_id, None)
            if noted is not None:
                key = (noted[0], noted[1], phase, error_reason(exc))
                self.refusals[key] = self.refusals.get(key, 0) + 1

    def started(self, container_id: str) -> None:
        with self.lock:
            noted = self.noted.get(container_id)
            if noted is not None:
                key = (noted[0], noted[1])
                self.starts[key] = self.starts.get(key, 0) + 1
                self.kbs_at_start[container_id] = noted[2]

    def forget(self, container_id: str) -> None:
        with self.lock:
            self.noted.pop(container_id, None)
            self.kbs_at_start.pop(container_id, None)

    def add_pod(self, out: Exposition) -> None:
        with self.lock:
            starts, refusals = dict(self.starts), dict(self.refusals)
        for (pod, kind), count in starts.items():
            out.add("clave_enclave_starts_total", label_text([*pod, ("handler", "enclave"), ("type", kind)]), count)
        for (pod, kind, phase, reason), count in refusals.items():
            out.add("clave_enclave_refusals_total", label_text([*pod, ("handler", "enclave"), ("type", kind),
                                                                ("phase", phase), ("reason", reason)]), count)

    def add_container(self, out: Exposition, labels: str, container_id: str, state_dir: str) -> None:
        from clave.engine import counters

        counts = counters.read(state_dir)
        with self.lock:
            at_start = self.kbs_at_start.get(container_id, 0)
        out.add("clave_enclave_attestation_requests_total", f'{labels},result="ok"', counts.get("attest.ok", 0))
        out.add("clave_enclave_attestation_requests_total", f'{labels},result="failed"',
                counts.get("attest.failed", 0))
        released, refused = counts.get("kbs.released", 0), counts.get("kbs.refused", 0)
        out.add("clave_enclave_kbs_fetches_total", f'{labels},phase="start",result="released"', at_start)
        out.add("clave_enclave_kbs_fetches_total", f'{labels},phase="request",result="released"', released)
        out.add("clave_enclave_kbs_fetches_total", f'{labels},phase="request",result="refused"', refused)
        out.add("clave_enclave_kbs_fetches_total", f'{labels},phase="request",result="failed"',
                counts.get("kbs.failed", 0))
        out.add("clave_enclave_attestation_verdicts_total", f'{labels},verdict="accepted"', at_start + released)
        out.add("clave_enclave_attestation_verdicts_total", f'{labels},verdict="refused"', refused)


# ----------------------------------------------------------------------------------------------- collect
def figures(engine: Any, container_id: str) -> tuple[dict[str, Any], dict[str, Any], int] | None:
    """What the engine says of one container: its state (with the handler's describe), its statistics (none
    unless it runs) and its OOM kills; None once it is gone."""
    try:
        state = engine.state(container_id)
    except (ClaveError, OSError):
        return None  # deleted meanwhile
    stats: dict[str, Any] = {}
    if state.get("status") in ("running", "paused", "created"):
        try:
            stats = engine.stats(container_id)
        except (ClaveError, OSError):
            pass
    oom = ((stats.get("memory") or {}).get("event_count") or {}).get("oom_kill")
    if oom is None:
        try:
            oom = engine.oom_kills(container_id)
        except (ClaveError, OSError):
            oom = 0
    return state, stats, int(oom)


def add_container(out: Exposition, container_id: str, handler: str, state: dict[str, Any], stats: dict[str, Any],
                  oom: int) -> str:
    """One container's families from what the engine said of it (``figures``); returns its label text."""
    labels = container_labels(container_id, state.get("annotations") or {}, handler)
    out.add("clave_container_info", f'{labels},status="{escape(str(state.get("status", "")))}"', 1)
    add_stats(out, labels, stats)
    out.add("clave_container_oom_events_total", labels, oom)
    enclave = state.get("enclave")
    if isinstance(enclave, dict):
        out.add("clave_enclave_info", f'{labels},type="{escape(str(enclave.get("type")))}",'
                                      f'insecure="{str(bool(enclave.get("insecure"))).lower()}"', 1)
    vm = state.get("vm")  # the vm handler's describe: boot (or restore) time and the VMM's resident memory
    if isinstance(vm, dict):
        if vm.get("boot_seconds") is not None:
            restored = "true" if vm.get("restored") else "false"
            out.add("clave_vm_boot_seconds", f'{labels},restored="{restored}"', float(vm["boot_seconds"]))
        if vm.get("vmm_rss_bytes") is not None:
            out.add("clave_vm_vmm_memory_bytes", labels, int(vm["vmm_rss_bytes"]))
    return labels


def collect(service: Any, shim: str = "") -> bytes:
    """One exposition of every container ``service`` (the shim's TaskService) serves; ``shim``: its pod's id."""
    began = time.perf_counter()
    out = Exposition()
    engine = service.engine
    with service.lock:
        containers = [(c.id, c.handler.name) for c in service.containers.values()]
    for container_id, handler in containers:
        figured = figures(engine, container_id)  # one after the other: two threads measured no faster
        if figured is None:
            continue
        state, stats, oom = figured
        labels = add_container(out, container_id, handler, state, stats, oom)
        if isinstance(state.get("enclave"), dict) and service.enclaves is not None:
            service.enclaves.add_container(out, labels, container_id, os.path.join(engine.root, container_id))
    if service.enclaves is not None:
        service.enclaves.add_pod(out)
    out.add("clave_shim_collect_seconds", label_text([("containerd_namespace", service.namespace), ("shim", shim)]),
            time.perf_counter() - began)
    return out.text()


# ------------------------------------------------------------------------------------------------ server
class MetricsServer:
    """HTTP/1.1 ``GET /metrics`` on a unix socket, one connection at a time (one scraper per node)."""

    def __init__(self, directory: str, render: Callable[[], bytes]) -> None:
        for attempt in range(3):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                break
            except FileNotFoundError:  # the namespace's directory removed by its last shim just now: again
                if attempt == 2:
                    raise
        self.directory = directory
        self.path = os.path.join(directory, SOCKET_NAME)
        self.render = render
        self.closed = False
        try:
            os.unlink(self.path)  # a dead shim's (the same pod id again)
        except FileNotFoundError:
            pass
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        address, fd = unix_address(self.path)
        try:
            self.sock.bind(address)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)

    def serve_forever(self) -> None:
        while not self.closed:
            try:
                fd, _ = self.sock._accept()  # type: ignore[attr-defined]  # _socket has no accept()
            except OSError:
                if self.closed:
                    return
                continue
            conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
            try:
                self.answer(conn)
            except OSError:
                pass  # the scraper went away
            finally:
                conn.close()

    def answer(self, conn: _socket.socket) -> None:
        conn.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            request += chunk
        method, _, rest = request.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif target != b"/metrics":
            status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
        else:
            try:
                status, body, kind = "200 OK", self.render(), CONTENT_TYPE
            except Exception as exc:  # a bug must not end the shim's metrics: say it, keep serving
                sys.stderr.write(f"clave shim metrics: {type(exc).__name__}: {exc}\n")
                status, body, kind = "500 Internal Server Error", f"{type(exc).__name__}: {exc}\n".encode(), \
                    "text/plain"
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        conn.sendall(head if method == b"HEAD" else head + body)

    def close(self) -> None:
        """Stop serving and remove the socket, the shim's directory and its namespace's if now empty (a shim
        making its own there meanwhile retries)."""
        self.closed = True
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self.sock.close()
        _remove(self.path, self.directory)


def _remove(path: str, directory: str) -> None:
    """unlink the socket, rmdir its directory, then the namespace's directory if that was the last one."""
    for remove in (os.unlink, os.rmdir, os.rmdir):
        try:
            remove(path)
        except OSError:
            return
        path, directory = directory, os.path.dirname(directory)


def serve(namespace: str, group_id: str, service: Any, slot: Any) -> None:
    """The shim's metrics thread: bind, then answer until the shim shuts down (``slot``, clave.shim.main's
    MetricsSlot, closes the server then, or at once if the shim ended while it was binding)."""
    try:
        server = MetricsServer(shim_directory(namespace, group_id), lambda: collect(service, group_id))
    except OSError as exc:
        sys.stderr.write(f"clave shim metrics: cannot serve in {shim_directory(namespace, group_id)}: {exc}\n")
        return
    if not slot.attach(server):
        server.close()
        return
    server.serve_forever()


def remove_if_dead(namespace: str, group_id: str) -> None:
    """After a shim died (containerd's ``delete``): remove its metrics directory unless a shim answers there."""
    directory = shim_directory(namespace, group_id)
    path = os.path.join(directory, SOCKET_NAME)
    if not os.path.exists(path):
        return
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    address, fd = unix_address(path)
    try:
        probe.connect(address)
        return  # alive: the pod's shim serves other containers
    except OSError:
        pass
    finally:
        probe.close()
        if fd is not None:
            os.close(fd)
    _remove(path, directory)
