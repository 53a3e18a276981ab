"""`clave device-plugin` against a kubelet played by the test: a Registration server on kubelet.sock in a private
directory, and kubelet's calls back to the plugin's endpoint (GetDevicePluginOptions, ListAndWatch,
GetPreferredAllocation, Allocate, PreStartContainer). The kubelet side's messages come from grpcio-tools compiling
protos/kubelet/deviceplugin_v1beta1.proto, so they cross-check Clave's own protobuf code the plugin speaks."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is a test dependency")
pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO / "tests" / "interop" / "cri"))
from cri_harness import load_proto_modules  # noqa: E402
from procs import stop_pid, wait_for  # noqa: E402

PROTO = REPO / "protos" / "kubelet" / "deviceplugin_v1beta1.proto"
CLAVE = Path(sys.executable).parent / "clave"
ENDPOINT = "clave-wasm-enclave.sock"


class Kubelet:
    """kubelet's side of the API: Registration on kubelet.sock (records requests, or refuses them)."""

    def __init__(self, directory: Path, pb: ModuleType, pb_grpc: ModuleType) -> None:
        self.directory = directory
        self.socket = directory / "kubelet.sock"
        self.pb, self.pb_grpc = pb, pb_grpc
        self.requests: queue.Queue[Any] = queue.Queue()
        self.refuse: str | None = None
        self.server: Any = None

    def Register(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method's name)
        self.requests.put(request)
        if self.refuse:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.refuse)
        return self.pb.Empty()

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.pb_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def stop(self) -> None:
        """As a restarting kubelet does: stop, and remove every socket in the directory (plugins' too)."""
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None
        for entry in self.directory.iterdir():
            if entry.is_socket():
                entry.unlink()

    def next_request(self, timeout: float = 15) -> Any:
        return self.requests.get(timeout=timeout)

    def plugin(self, endpoint: str = ENDPOINT) -> Any:
        channel = grpc.insecure_channel(f"unix://{self.directory / endpoint}")
        return self.pb_grpc.DevicePluginStub(channel), channel


@dataclass
class Plugin:
    process: subprocess.Popen[str]
    backing: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    # named as tests/proto/test_messages.py compiles it (relative to protos/), which may run in this process too
    return load_proto_modules(PROTO, tmp_path_factory.mktemp("dpgen"), root=REPO / "protos")


@pytest.fixture
def kubelet(tmp_path: Path, protos: tuple[ModuleType, ModuleType]) -> Iterator[Kubelet]:
    directory = tmp_path / "device-plugins"
    directory.mkdir()
    instance = Kubelet(directory, *protos)
    instance.start()
    yield instance
    instance.stop()


def start_plugin(kubelet: Kubelet, tmp_path: Path, *extra: str) -> Plugin:
    backing = tmp_path / "libwasmtime.so"
    backing.write_bytes(b"stands for the runtime's library")
    log = tmp_path / "plugin.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(CLAVE), "device-plugin", "--kubelet-dir", str(kubelet.directory),
                                    "--wasm-slots", "4", "--wasm-runtime", str(backing), "--interval", "0.1", *extra],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    return Plugin(process, backing, log)


@pytest.fixture
def plugin(kubelet: Kubelet, tmp_path: Path) -> Iterator[Plugin]:
    instance = start_plugin(kubelet, tmp_path)
    yield instance
    stop_pid(instance.process.pid)
    instance.process.wait(timeout=10)


def device_list(response: Any) -> list[tuple[str, str]]:
    return [(d.ID, d.health) for d in response.devices]


def test_registration_and_list_and_watch(kubelet: Kubelet, plugin: Plugin) -> None:
    request = kubelet.next_request()
    assert request.version == "v1beta1"
    assert request.endpoint == ENDPOINT
    assert request.resource_name == "clave.io/wasm-enclave"
    assert request.options.get_preferred_allocation_available and not request.options.pre_start_required
    assert kubelet.requests.empty(), "one resource here: no SGX"
    assert "no SGX here" in plugin.output() and "not advertising alibabacloud.com/sgx_epc_MiB" in plugin.output()

    stub, channel = kubelet.plugin(request.endpoint)
    with channel:
        options = stub.GetDevicePluginOptions(kubelet.pb.Empty(), timeout=5)
        assert options.get_preferred_allocation_available and not options.pre_start_required
        stream = stub.ListAndWatch(kubelet.pb.Empty(), timeout=30)
        first = next(stream)
        assert device_list(first) == [(f"wasm-{i}", "Healthy") for i in range(4)]
        stream.cancel()


def test_allocate_preferred_allocation_and_pre_start(kubelet: Kubelet, plugin: Plugin) -> None:
    pb = kubelet.pb
    kubelet.next_request()
    stub, channel = kubelet.plugin()
    with channel:
        response = stub.Allocate(pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=["wasm-1"]),
            pb.ContainerAllocateRequest(devices_ids=["wasm-2", "wasm-3"])]), timeout=5)
        assert len(response.container_responses) == 2
        for container in response.container_responses:
            assert dict(container.envs) == {"ENCLAVE_TYPE": "wasm"}
            assert dict(container.annotations) == {"enclave.type": "wasm"}
            assert not container.devices and not container.mounts  # a wasm enclave needs no device
        with pytest.raises(grpc.RpcError) as err:
            stub.Allocate(pb.AllocateRequest(container_requests=[
                pb.ContainerAllocateRequest(devices_ids=["wasm-9"])]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "wasm-9" in err.value.details()

        preferred = stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=["wasm-3", "wasm-1", "wasm-2"],
                                                   must_include_deviceIDs=["wasm-2"], allocation_size=2)]),
            timeout=5)
        assert [list(c.deviceIDs) for c in preferred.container_responses] == [["wasm-2", "wasm-1"]]
        assert stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=["wasm-1"]), timeout=5) \
            == pb.PreStartContainerResponse()


def test_health_change_is_pushed(kubelet: Kubelet, plugin: Plugin) -> None:
    kubelet.next_request()
    stub, channel = kubelet.plugin()
    with channel:
        stream = stub.ListAndWatch(kubelet.pb.Empty(), timeout=30)
        assert {health for _, health in device_list(next(stream))} == {"Healthy"}
        plugin.backing.unlink()  # the runtime's files are gone
        assert device_list(next(stream)) == [(f"wasm-{i}", "Unhealthy") for i in range(4)]
        with pytest.raises(grpc.RpcError) as err:
            stub.Allocate(kubelet.pb.AllocateRequest(container_requests=[
                kubelet.pb.ContainerAllocateRequest(devices_ids=["wasm-0"])]), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        plugin.backing.write_bytes(b"back")
        assert device_list(next(stream)) == [(f"wasm-{i}", "Healthy") for i in range(4)]
        stream.cancel()
    assert "Unhealthy (missing" in plugin.output()


def test_registers_again_when_kubelet_restarts(kubelet: Kubelet, plugin: Plugin) -> None:
    kubelet.next_request()
    stub, channel = kubelet.plugin()
    with channel:
        stream = stub.ListAndWatch(kubelet.pb.Empty(), timeout=10)
        next(stream)
        kubelet.stop()  # kubelet.sock and the plugin's socket are removed, as kubelet does when it restarts
        with pytest.raises((grpc.RpcError, StopIteration)):
            next(stream)  # the plugin ends the old kubelet's stream
        assert "went away" in plugin.output()
    kubelet.start()
    again = kubelet.next_request()
    assert (again.resource_name, again.endpoint) == ("clave.io/wasm-enclave", ENDPOINT)
    assert (kubelet.directory / ENDPOINT).is_socket()
    stub, channel = kubelet.plugin()
    with channel:
        stream = stub.ListAndWatch(kubelet.pb.Empty(), timeout=30)
        assert len(next(stream).devices) == 4
        stream.cancel()
    assert "kubelet went away" in plugin.output() and "registering again" in plugin.output()


def test_clean_shutdown_leaves_no_socket(kubelet: Kubelet, plugin: Plugin) -> None:
    kubelet.next_request()
    stub, channel = kubelet.plugin()
    with channel:
        stream = stub.ListAndWatch(kubelet.pb.Empty(), timeout=30)
        next(stream)
        plugin.process.send_signal(signal.SIGTERM)
        assert plugin.process.wait(timeout=10) == 0, plugin.output()
    assert not (kubelet.directory / ENDPOINT).exists()
    assert [p.name for p in kubelet.directory.iterdir()] == ["kubelet.sock"]


def test_refused_registration_stops_the_plugin(kubelet: Kubelet, tmp_path: Path) -> None:
    kubelet.refuse = "resource name taken"
    plugin = start_plugin(kubelet, tmp_path)
    try:
        assert plugin.process.wait(timeout=20) == 1
    finally:
        stop_pid(plugin.process.pid)
    lines = plugin.output().strip().splitlines()
    assert lines[-1].startswith("kubelet refused clave.io/wasm-enclave") and "resource name taken" in lines[-1]
    assert [p.name for p in kubelet.directory.iterdir()] == ["kubelet.sock"]


def test_waits_for_kubelet(kubelet: Kubelet, tmp_path: Path) -> None:
    """Started before kubelet (no kubelet.sock yet): it registers once kubelet is up."""
    kubelet.stop()
    plugin = start_plugin(kubelet, tmp_path)
    try:
        wait_for(lambda: "waiting for kubelet" in plugin.output(), "the plugin to wait for kubelet")
        kubelet.start()
        assert kubelet.next_request().resource_name == "clave.io/wasm-enclave"
    finally:
        stop_pid(plugin.process.pid)
        plugin.process.wait(timeout=10)


@pytest.mark.parametrize("args, message", [
    (["--kubelet-dir", "/nonexistent/device-plugins"], "/nonexistent/device-plugins does not exist"),
    (["--wasm-slots", "-1"], "--wasm-slots must be 0 or more"),
    (["--interval", "soon"], "invalid value 'soon' for --interval"),
    (["--wasm-slots", "0"], "no resource to advertise"),
    (["extra"], "takes no arguments"),
])
def test_bad_input_is_one_line(kubelet: Kubelet, args: list[str], message: str) -> None:
    argv = [str(CLAVE), "device-plugin", "--kubelet-dir", str(kubelet.directory), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert message in last, result.stderr
    assert [p.name for p in kubelet.directory.iterdir()] == ["kubelet.sock"]


# --- SGX: detection and Allocate on a host tree made up by the test (no SGX on these machines) -------------------


def test_no_sgx_on_this_host() -> None:
    from clave.k8s import deviceplugin

    if os.path.exists("/dev/sgx_enclave"):
        pytest.skip("this host has SGX")
    assert deviceplugin.detect_sgx() is None


def test_sgx_epc_from_sysfs_and_allocate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clave.k8s import deviceplugin
    from clave.proto.generated import v1beta1

    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    (dev / "sgx_enclave").touch()
    (dev / "sgx_provision").touch()
    for node, size in (("node0", 64), ("node1", 32)):
        (sysfs / "devices/system/node" / node / "x86").mkdir(parents=True)
        (sysfs / "devices/system/node" / node / "x86" / "sgx_total_bytes").write_text(f"{size * 1024 * 1024}\n")
    aesmd = tmp_path / "aesmd"
    aesmd.mkdir()
    monkeypatch.setattr(deviceplugin, "AESMD_DIR", str(aesmd))
    host = deviceplugin.detect_sgx(str(dev), str(sysfs), str(tmp_path / "no-cpuid"))
    assert host is not None and host.epc_bytes == 96 * 1024 * 1024
    resource = deviceplugin.sgx_resource(host)
    assert resource.name == "alibabacloud.com/sgx_epc_MiB" and len(resource.device_ids) == 96
    assert resource.probe() is None
    response = resource.allocation(resource.device_ids[:8])
    assert isinstance(response, v1beta1.ContainerAllocateResponse)
    assert [(d.container_path, d.host_path, d.permissions) for d in response.devices] == [
        ("/dev/sgx_enclave", str(dev / "sgx_enclave"), "rw"), ("/dev/sgx_provision", str(dev / "sgx_provision"), "rw")]
    assert [(m.container_path, m.host_path) for m in response.mounts] == [(str(aesmd), str(aesmd))]
    (dev / "sgx_enclave").unlink()
    assert "sgx_enclave" in (resource.probe() or "")


def test_sgx_without_a_known_epc_size_is_not_advertised(tmp_path: Path) -> None:
    from clave.k8s import deviceplugin

    (tmp_path / "sgx_enclave").touch()
    assert deviceplugin.detect_sgx(str(tmp_path), str(tmp_path / "sys"), str(tmp_path / "no-cpuid")) is None


def test_sgx_epc_from_cpuid(tmp_path: Path) -> None:
    """CPUID leaf 0x12 sub-leaves through the cpuid driver's file layout: offset = leaf | subleaf << 32."""
    import struct

    from clave.k8s import deviceplugin

    class FakeCpuid:
        def __init__(self, sections: list[int]) -> None:
            self.sections = sections

        def pread(self, fd: int, size: int, offset: int) -> bytes:
            leaf, subleaf = offset & 0xFFFFFFFF, offset >> 32
            assert (leaf, size) == (0x12, 16)
            index = subleaf - 2
            if index >= len(self.sections):
                return struct.pack("<4I", 0, 0, 0, 0)
            epc = self.sections[index]
            return struct.pack("<4I", 1, 0, (epc & 0xFFFFF000) | 1, epc >> 32)  # type 1, ECX low bits: flags

    device = tmp_path / "cpuid"
    device.touch()
    fake = FakeCpuid([128 * 1024 * 1024, 6 << 32])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deviceplugin.os, "pread", fake.pread)
        assert deviceplugin.sgx_epc_bytes_from_cpuid(str(device)) == 128 * 1024 * 1024 + (6 << 32)
    assert deviceplugin.sgx_epc_bytes_from_cpuid(str(tmp_path / "none")) is None
