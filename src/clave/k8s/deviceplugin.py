"""`clave device-plugin`: kubelet's device-plugin API v1beta1 for enclave resources.

Two resources, each served as its own DevicePlugin on its own socket in kubelet's device-plugin directory and
registered with kubelet's Registration service on ``kubelet.sock`` (the API's model: one resource per endpoint):

- ``clave.io/wasm-enclave``: WebAssembly enclave slots, on every node (a configurable count). Allocate gives the
  container ``ENCLAVE_TYPE=wasm`` (and the ``enclave.type`` annotation), which selects the built-in WebAssembly
  enclave runtime. The slots are healthy while the runtime's files exist (wasmtime's C library by default).
- ``alibabacloud.com/sgx_epc_MiB``: SGX EPC in MiB, only where SGX exists (``/dev/sgx_enclave``; the size from
  sysfs ``sgx_total_bytes`` or CPUID leaf 0x12 through ``/dev/cpu/0/cpuid``). Allocate gives the SGX device nodes
  and the aesmd socket directory. Without SGX the plugin says so and advertises none.

Health is polled; a change is pushed to every open ListAndWatch stream. kubelet removes every socket in its
directory when it restarts and recreates ``kubelet.sock``: the plugin watches that socket and, when it comes back
(a new inode), serves again on fresh sockets and registers again.

The messages are Clave's own protobuf code (protos/kubelet/deviceplugin_v1beta1.proto through scripts/gen_proto.py);
gRPC is grpcio, imported only by this module (the `k8s` extra).
"""

from __future__ import annotations

import os
import signal
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from clave.errors import ClaveError
from clave.proto.generated import v1beta1 as pb

API_VERSION = "v1beta1"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
WASM_RESOURCE = "clave.io/wasm-enclave"
SGX_EPC_RESOURCE = "alibabacloud.com/sgx_epc_MiB"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
SGX_DEVICES = ("/dev/sgx_enclave", "/dev/sgx_provision")
AESMD_DIR = "/var/run/aesmd"
MIB = 1 << 20


class DevicePluginError(ClaveError):
    pass


class RegistrationError(DevicePluginError):
    """kubelet refused the registration: the API says the plugin must then stop."""


# --- resources -----------------------------------------------------------------------------------------------


@dataclass
class Resource:
    """One advertised resource: its devices, how to tell their health, what Allocate hands a container."""

    name: str
    endpoint: str  # socket file name in kubelet's directory
    device_ids: list[str]
    probe: Callable[[], str | None]  # None when the backing is there, else why the devices are unhealthy
    allocation: Callable[[list[str]], pb.ContainerAllocateResponse]

    def devices(self, health: str) -> list[pb.Device]:
        return [pb.Device(ID=device_id, health=health) for device_id in self.device_ids]


def files_present(paths: Sequence[str]) -> Callable[[], str | None]:
    def probe() -> str | None:
        missing = [path for path in paths if not os.path.exists(path)]
        return f"missing {', '.join(missing)}" if missing else None

    return probe


def default_wasm_backing() -> list[str]:
    """The files the built-in WebAssembly enclave runtime cannot start without: wasmtime's C library."""
    from clave.enclave.wasm import capi

    return [capi.library_path()]


def wasm_resource(slots: int, backing: Sequence[str]) -> Resource:
    def allocate(ids: list[str]) -> pb.ContainerAllocateResponse:
        return pb.ContainerAllocateResponse(envs={"ENCLAVE_TYPE": "wasm"}, annotations={"enclave.type": "wasm"})

    return Resource(WASM_RESOURCE, "clave-wasm-enclave.sock", [f"wasm-{i}" for i in range(slots)],
                    files_present(list(backing)), allocate)


@dataclass
class SgxHost:
    """What this host has of SGX: the EPC size and where its device nodes and aesmd socket are."""

    epc_bytes: int
    devices: list[str] = field(default_factory=list)
    aesmd_dir: str | None = None


def sgx_epc_bytes_from_sysfs(sysfs: str = "/sys") -> int | None:
    """Sum of the per-NUMA-node ``x86/sgx_total_bytes`` (Linux 5.17+), None when the kernel exposes none."""
    nodes = os.path.join(sysfs, "devices/system/node")
    total, found = 0, False
    for node in sorted(os.listdir(nodes)) if os.path.isdir(nodes) else []:
        try:
            with open(os.path.join(nodes, node, "x86", "sgx_total_bytes")) as f:
                total += int(f.read().strip())
                found = True
        except (OSError, ValueError):
            continue
    return total if found else None


def sgx_epc_bytes_from_cpuid(cpuid_device: str = "/dev/cpu/0/cpuid") -> int | None:
    """EPC sections from CPUID leaf 0x12, sub-leaves 2.. (the cpuid driver: offset = leaf | subleaf << 32)."""
    try:
        fd = os.open(cpuid_device, os.O_RDONLY)
    except OSError:
        return None
    try:
        total = 0
        for subleaf in range(2, 2 + 32):
            eax, _ebx, ecx, edx = struct.unpack("<4I", os.pread(fd, 16, 0x12 | (subleaf << 32)))
            if eax & 0xF != 1:  # 0: no more sections; anything else is not an EPC section
                break
            total += (ecx & 0xFFFFF000) | ((edx & 0xFFFFF) << 32)
        return total or None
    except OSError:
        return None
    finally:
        os.close(fd)


def detect_sgx(dev: str = "/dev", sysfs: str = "/sys", cpuid_device: str = "/dev/cpu/0/cpuid") -> SgxHost | None:
    """SGX as the SGX device plugins see it: the in-kernel driver's /dev/sgx_enclave and a known EPC size."""
    enclave = os.path.join(dev, "sgx_enclave")
    if not os.path.exists(enclave):
        return None
    epc = sgx_epc_bytes_from_sysfs(sysfs) or sgx_epc_bytes_from_cpuid(cpuid_device)
    if not epc:
        return None
    devices = [path for path in (enclave, os.path.join(dev, "sgx_provision")) if os.path.exists(path)]
    return SgxHost(epc, devices, AESMD_DIR if os.path.isdir(AESMD_DIR) else None)


def sgx_resource(host: SgxHost) -> Resource:
    def allocate(ids: list[str]) -> pb.ContainerAllocateResponse:
        # Inside the container the devices keep their host names: the SGX SDKs open them by those paths.
        devices = [pb.DeviceSpec(container_path="/dev/" + os.path.basename(path), host_path=path, permissions="rw")
                   for path in host.devices]
        mounts = [pb.Mount(container_path=AESMD_DIR, host_path=host.aesmd_dir)] if host.aesmd_dir else []
        return pb.ContainerAllocateResponse(devices=devices, mounts=mounts)

    return Resource(SGX_EPC_RESOURCE, "clave-sgx-epc.sock", [f"epc-{i}" for i in range(host.epc_bytes // MIB)],
                    files_present(host.devices), allocate)


# --- the DevicePlugin service --------------------------------------------------------------------------------


def plugin_options() -> pb.DevicePluginOptions:
    """What kubelet learns at Register and from GetDevicePluginOptions: no PreStartContainer needed."""
    return pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


def _unary(handler: Callable[[Any, grpc.ServicerContext], Any], request_type: type[Any]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=request_type.decode,
                                               response_serializer=lambda message: message.encode())


class DevicePluginServer:
    """One resource's DevicePlugin gRPC service on its socket; ListAndWatch streams follow ``set_health``."""

    def __init__(self, resource: Resource, directory: str) -> None:
        self.resource = resource
        self.socket = os.path.join(directory, resource.endpoint)
        self.health = HEALTHY
        self._changed = threading.Condition()
        self._generation = 0
        self._stopping = False
        self._server: grpc.Server | None = None

    # The RPCs ------------------------------------------------------------------------------------------------

    def options(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.DevicePluginOptions:
        return plugin_options()

    def list_and_watch(self, request: pb.Empty, context: grpc.ServicerContext) -> Iterator[pb.ListAndWatchResponse]:
        context.add_callback(self._wake)  # a client gone must not keep a worker waiting
        seen = -1

        def news() -> bool:
            return self._generation != seen or self._stopping or not context.is_active()

        while True:
            with self._changed:
                self._changed.wait_for(news)
                if self._stopping or not context.is_active():
                    return
                seen, health = self._generation, self.health
            yield pb.ListAndWatchResponse(devices=self.resource.devices(health))

    def preferred_allocation(self, request: pb.PreferredAllocationRequest,
                             context: grpc.ServicerContext) -> pb.PreferredAllocationResponse:
        # The slots are interchangeable: the ones kubelet must include, then the lowest-numbered available.
        responses = []
        for ask in request.container_requests:
            chosen = list(dict.fromkeys(ask.must_include_deviceIDs))
            order = {device_id: i for i, device_id in enumerate(self.resource.device_ids)}
            rest = sorted((d for d in ask.available_deviceIDs if d not in chosen), key=lambda d: order.get(d, 1 << 30))
            chosen += rest[: max(ask.allocation_size - len(chosen), 0)]
            responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return pb.PreferredAllocationResponse(container_responses=responses)

    def allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        known = set(self.resource.device_ids)
        responses = []
        for ask in request.container_requests:
            unknown = [d for d in ask.devices_ids if d not in known]
            if unknown:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{self.resource.name}: unknown device ids {', '.join(unknown)}")
            if self.health != HEALTHY:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.resource.name} is unhealthy")
            responses.append(self.resource.allocation(list(ask.devices_ids)))
        return pb.AllocateResponse(container_responses=responses)

    def pre_start(self, request: pb.PreStartContainerRequest,
                  context: grpc.ServicerContext) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()

    # Life cycle ----------------------------------------------------------------------------------------------

    def set_health(self, health: str) -> bool:
        """Record the devices' health; True (and every stream gets the new list) when it changed."""
        with self._changed:
            if health == self.health:
                return False
            self.health = health
            self._generation += 1
            self._changed.notify_all()
            return True

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def start(self) -> None:
        """Serve on a fresh socket (a stale one from a previous run or a restarted kubelet is replaced)."""
        if self._server is not None:
            self.stop()  # ends the streams of the kubelet that went away
        _remove_socket(self.socket)
        with self._changed:
            self._stopping = False
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="device-plugin"))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("v1beta1.DevicePlugin", {
            "GetDevicePluginOptions": _unary(self.options, pb.Empty),
            "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                self.list_and_watch, request_deserializer=pb.Empty.decode,
                response_serializer=lambda message: message.encode()),
            "GetPreferredAllocation": _unary(self.preferred_allocation, pb.PreferredAllocationRequest),
            "Allocate": _unary(self.allocate, pb.AllocateRequest),
            "PreStartContainer": _unary(self.pre_start, pb.PreStartContainerRequest),
        })])
        if server.add_insecure_port(f"unix://{self.socket}") == 0:
            raise DevicePluginError(f"cannot listen on {self.socket}")
        server.start()
        self._server = server

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None
        _remove_socket(self.socket)


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def register(kubelet_socket: str, server: DevicePluginServer, timeout: float = 10.0) -> None:
    """kubelet's Registration.Register for one resource; kubelet then connects back to its endpoint."""
    request = pb.RegisterRequest(version=API_VERSION, endpoint=server.resource.endpoint,
                                 resource_name=server.resource.name, options=plugin_options())
    with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
        call = channel.unary_unary("/v1beta1.Registration/Register", request_serializer=lambda m: m.encode(),
                                   response_deserializer=pb.Empty.decode)
        try:
            call(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise RegistrationError(f"kubelet refused {server.resource.name} at {kubelet_socket}: "
                                    f"{exc.code().name}: {exc.details()}") from None


# --- the plugin: serve, register, watch ----------------------------------------------------------------------


def _socket_identity(path: str) -> tuple[int, int, int] | None:
    """Which socket is at ``path``: an inode can be reused at once, so its change time counts too."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


class DevicePlugin:
    """Every resource's server, registered with kubelet and kept registered across kubelet restarts."""

    def __init__(self, resources: Sequence[Resource], kubelet_dir: str = KUBELET_DIR, interval: float = 5.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.kubelet_dir = kubelet_dir
        self.kubelet_socket = os.path.join(kubelet_dir, KUBELET_SOCKET)
        self.interval = interval
        self.servers = [DevicePluginServer(resource, kubelet_dir) for resource in resources]
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stopped = threading.Event()
        self._registered_with: tuple[int, int, int] | None = None
        self._registrations = 0

    def check_health(self) -> None:
        for server in self.servers:
            reason = server.resource.probe()
            if server.set_health(UNHEALTHY if reason else HEALTHY):
                count, detail = len(server.resource.device_ids), f" ({reason})" if reason else ""
                self.say(f"{server.resource.name}: {count} devices now {server.health}{detail}")

    def serve_and_register(self) -> None:
        """(Re)start every server on a fresh socket and register it with the kubelet now listening."""
        kubelet = _socket_identity(self.kubelet_socket)
        for server in self.servers:
            server.start()
            register(self.kubelet_socket, server)
            self.say(f"registered {server.resource.name} ({len(server.resource.device_ids)} devices, "
                     f"{server.health}) with kubelet at {self.kubelet_socket}, serving {server.socket}")
        self._registered_with = kubelet
        self._registrations += 1

    def step(self) -> None:
        """One round of the watch: health, and a new kubelet (its socket recreated) means register again."""
        self.check_health()
        kubelet = _socket_identity(self.kubelet_socket)
        if kubelet is None:
            if self._registered_with is not None:
                # kubelet removed our sockets too: stop serving (ending its streams) until it is back.
                self.say(f"kubelet went away ({self.kubelet_socket} removed): waiting for it")
                self._registered_with = None
                for server in self.servers:
                    server.stop()
            return
        if kubelet != self._registered_with:
            if self._registrations:
                self.say(f"kubelet restarted ({self.kubelet_socket} is new): serving and registering again")
            self.serve_and_register()

    def run(self) -> None:
        if not os.path.isdir(self.kubelet_dir):
            raise DevicePluginError(f"{self.kubelet_dir} does not exist: is this a kubelet node? (--kubelet-dir)")
        if not self.servers:
            raise DevicePluginError("no resource to advertise")
        if _socket_identity(self.kubelet_socket) is None:
            self.say(f"waiting for kubelet at {self.kubelet_socket}")
        try:
            while not self.stopped.is_set():
                self.step()
                self.stopped.wait(self.interval)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stopped.set()
        for server in self.servers:
            server.stop()


def resources_for_host(wasm_slots: int, wasm_backing: Sequence[str] | None = None,
                       say: Callable[[str], None] | None = None) -> list[Resource]:
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    resources = []
    if wasm_slots > 0:
        resources.append(wasm_resource(wasm_slots, list(wasm_backing) if wasm_backing else default_wasm_backing()))
    sgx = detect_sgx()
    if sgx is None:
        say(f"no SGX here (no /dev/sgx_enclave with a known EPC size): not advertising {SGX_EPC_RESOURCE}")
    else:
        resources.append(sgx_resource(sgx))
        say(f"SGX: {sgx.epc_bytes // MIB} MiB of EPC, devices {', '.join(sgx.devices)}")
    return resources


def main(kubelet_dir: str, wasm_slots: int, wasm_backing: Sequence[str] | None, interval: float) -> int:
    plugin = DevicePlugin(resources_for_host(wasm_slots, wasm_backing), kubelet_dir, interval)

    def stop(signum: int, _frame: object) -> None:
        plugin.stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    plugin.run()
    plugin.say("device plugin stopped")
    return 0
