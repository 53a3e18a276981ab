"""One node, three RuntimeClasses: containerd 1.6 configured by `clave node install` (test_node's
`installed_node`: private root, state and socket, the shim linked in a bin directory of its own), with CNI's
bridge plugin on a bridge of the test's own (no gateway, no masquerading, host-local IPAM in a private dataDir),
runs three pods side by side, each through its RuntimeClass's handler:

- `clave`: a native busybox pod;
- `clave-enclave`: a Python app image, signed with `clave enclave sign`, run in the WebAssembly enclave
  (`enclave.type=wasm`, the annotation the device plugin's Allocate sets);
- `clave-vm`: a busybox pod in a VM (a vm pod needs a network namespace of its own: hence CNI).

Each gets ExecSync, ContainerStats, PodSandboxStats and a container log in CRI format; while all three run,
`clave-monitor` (on loopback) reports each container with its handler and pod labels, and the vm container's boot
time. Removing the pods leaves no shim, engine state, cgroup, mount or QEMU behind. Every daemon is stopped by its
pid; the bridge is deleted at the end.

PodSandboxStats reads a pod's figures from the host cgroup its cgroup_parent names: for the vm pod, QEMU and
its keeper live there (the sandbox container's cgroup), with the pod's limits plus the VM's overhead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO / "tests" / "interop" / "cri"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_cri_vm import CNI_BIN, pod_config, qemu_pids, start_container, vm_dir  # noqa: E402
from test_monitor import _samples, _scrape, _start_monitor  # noqa: E402
from test_node import CLAVE, installed_node  # noqa: E402, F401  (the fixture: install into a private containerd)

# The three pods: RuntimeClass handler -> (pod name, the handler label clave-monitor gives its containers)
PODS = {"clave": ("native-pod", "native"), "clave-enclave": ("enclave-pod", "enclave"), "clave-vm": ("vm-pod", "vm")}
APP_IMAGE = "localhost/clave/three-pyapp:1"
APP = ("import time\n"
       "print('python in the enclave', open('motd.txt').read().strip(), flush=True)\n"
       "while True:\n"
       "    time.sleep(1)\n")
CRI_LOG_LINE = r"^\S+ stdout F {}$"  # CRI's log format: "<RFC 3339 time> <stream> <P|F> <line>"


@dataclass
class Pod:
    handler: str  # the RuntimeClass handler
    label: str  # clave-monitor's handler label
    id: str
    config: Any  # the PodSandboxConfig
    container: str
    expected_log: str  # a line the container writes to its log


@dataclass
class Node:
    cri: Any  # cri_harness.Cri
    base: Path
    prefix: Path
    pods: dict[str, Pod]
    vm_dir: str  # the vm pod's VM state directory


def _cni(base: Path) -> str:
    """CNI's bridge plugin on a bridge of our own in installed_node's CNI directories (cri_section names them):
    the plugins linked from Debian's containernetworking-plugins, one network config. Returns the bridge."""
    cni = base / "cni"
    for plugin in CNI_BIN.iterdir():
        (cni / "bin" / plugin.name).symlink_to(plugin)
    bridge = f"clv3{uuid.uuid4().hex[:8]}"
    network = {"cniVersion": "0.4.0", "name": "clave-three", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": f"10.252.{os.getpid() % 250}.0/24",
                 "dataDir": str(base / "ipam")}}]}
    (cni / "conf" / "10-three.conflist").write_text(json.dumps(network))
    return bridge


def _app_image(base: Path) -> Path:
    """A busybox image holding a Python app (`python3 app.py`), signed for the WebAssembly enclave."""
    from cri_harness import write_oci_image

    from clave.tools import bundles

    bundle = base / "pyapp"
    bundles.make_app_bundle(str(bundle), {"/app/app.py": APP, "/app/motd.txt": "from the image"},
                            ["python3", "app.py"], cwd="/app")
    for argv in (["enclave", "keygen", "--out", str(base / "signer.pem")],
                 ["enclave", "sign", "--key", str(base / "signer.pem"), str(bundle)]):
        result = subprocess.run([str(CLAVE), *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    return write_oci_image(bundle / "rootfs", APP_IMAGE, {"Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/app",
                                                          "Cmd": ["python3", "app.py"]}, base / "pyapp.tar")


def _run_pod(cri: Any, handler: str, name: str) -> tuple[str, Any]:
    sandbox = pod_config(cri, name)  # the pod's own network namespace (CNI), namespace clave-test
    Path(sandbox.log_directory).mkdir(parents=True)
    pod = cri.runtime.RunPodSandbox(cri.pb.RunPodSandboxRequest(config=sandbox, runtime_handler=handler),
                                    timeout=180).pod_sandbox_id
    cri.pods.append(pod)
    return pod, sandbox


def _start_enclave_app(cri: Any, pod: str, sandbox: Any) -> str:
    pb = cri.pb
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="app"), image=pb.ImageSpec(image=APP_IMAGE),
                                log_path="app.log", annotations={"enclave.type": "wasm"})
    cid = cri.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=config,
                                                                sandbox_config=sandbox), timeout=120).container_id
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    return str(cid)


@pytest.fixture(scope="module")
def three(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "gcc", "qemu-system-x86_64", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not (CNI_BIN / "bridge").exists():
        pytest.skip("CNI's bridge plugin is not installed (Debian's containernetworking-plugins)")
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    pytest.importorskip("wasmtime")
    from clave.enclave.wasm import interpreters

    try:
        interpreters.PYTHON.module_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from cri_harness import ctr, running_cri

    from clave.vm.guest import build_guest

    build_guest()  # cached: the guest the vm handler boots is the one of these sources
    base, prefix, _ = request.getfixturevalue("installed_node")
    bridge = _cni(base)
    app_tar = _app_image(base)
    try:
        with running_cri(base, base / "config.toml", path=(base / "bin",)) as cri:
            ctr(cri.address, "image", "import", str(app_tar))
            pods: dict[str, Pod] = {}
            for handler, (name, label) in PODS.items():
                pod, sandbox = _run_pod(cri, handler, name)
                if handler == "clave-enclave":
                    cid, line = _start_enclave_app(cri, pod, sandbox), "python in the enclave from the image"
                else:
                    cid = start_container(cri, pod, sandbox, "app", 'trap "exit 0" TERM; echo hello from $0 in '
                                          f'{handler}; while true; do sleep 0.2; done')
                    line = f"hello from sh in {handler}"
                pods[handler] = Pod(handler, label, pod, sandbox, cid, line)
            yield Node(cri, base, prefix, pods, vm_dir(pods["clave-vm"].id))
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _exec(cri: Any, cid: str, *cmd: str) -> tuple[int, bytes, bytes]:
    out = cri.runtime.ExecSync(cri.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=60), timeout=90)
    return out.exit_code, out.stdout, out.stderr


def test_three_pods_side_by_side(three: Node) -> None:
    """Each pod through its handler, served by the installed shim, at the same time: ExecSync, ContainerStats,
    PodSandboxStats, and the container's log in CRI format."""
    import grpc
    from cri_harness import NAMESPACE, container_status, wait_cri

    cri, pb = three.cri, three.cri.pb
    tasks = three.base / "state" / "io.containerd.runtime.v2.task" / NAMESPACE
    shims = {(tasks / pod.id / "address").read_text() for pod in three.pods.values()}
    assert len(shims) == 3, "a shim of its own for each pod, all three serving"
    listed = cri.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
    assert {(p.id, p.runtime_handler, p.state) for p in listed} >= {
        (pod.id, pod.handler, pb.SANDBOX_READY) for pod in three.pods.values()}
    for pod in three.pods.values():
        status, info = container_status(cri, pod.container)
        assert status.state == pb.CONTAINER_RUNNING, (pod.handler, status)
        assert info["runtimeType"] == "io.containerd.clave.v2"
        assert info["runtimeOptions"]["config_path"] == str(three.prefix / "etc" / f"runtime-{pod.handler}.toml")

        log = Path(pod.config.log_directory) / "app.log"
        wait_cri(lambda log=log, pod=pod: log.exists() and pod.expected_log in log.read_text(),
                 f"{pod.handler}'s output in its log", timeout=60)
        assert re.search(CRI_LOG_LINE.format(re.escape(pod.expected_log)), log.read_text(), re.M), log.read_text()

        stats = cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=pod.container), timeout=60).stats
        assert stats.attributes.id == pod.container and stats.attributes.metadata.name == "app", pod.handler
        assert stats.cpu.usage_core_nano_seconds.value > 0, (pod.handler, stats)
        assert stats.memory.working_set_bytes.value > 0, (pod.handler, stats)

        try:
            sandbox = cri.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod.id), timeout=60).stats
        except grpc.RpcError as exc:
            raise AssertionError(f"PodSandboxStats of the {pod.handler} pod: {exc.details()}") from None
        assert sandbox.attributes.id == pod.id and sandbox.attributes.metadata.name == pod.config.metadata.name
        assert pod.container in [c.attributes.id for c in sandbox.linux.containers], (pod.handler, sandbox)
        assert sandbox.linux.memory.working_set_bytes.value > 0, (pod.handler, sandbox)

    # ExecSync: a process next to the app, in its container (its own kernel in the VM, its enclave)
    native, enclave, vm = (three.pods[h].container for h in ("clave", "clave-enclave", "clave-vm"))
    assert _exec(cri, native, "sh", "-c", "echo out; echo err >&2; exit 3") == (3, b"out\n", b"err\n")
    code, boot_id, err = _exec(cri, vm, "cat", "/proc/sys/kernel/random/boot_id")
    assert code == 0 and len(boot_id) == 37, (boot_id, err)
    assert boot_id != Path("/proc/sys/kernel/random/boot_id").read_bytes(), "the guest's kernel, not the host's"
    code, out, err = _exec(cri, enclave, "python3", "-c", "import sys; print('exec in', sys.platform, 6 * 7)")
    assert (code, out) == (0, b"exec in wasi 42\n"), err


def test_monitor_reports_all_three(three: Node) -> None:
    """clave-monitor gathers the three shims: each container with its handler and pod labels, and the vm
    container's boot time."""
    from cri_harness import wait_cri
    from procs import stop_pid

    monitor, url = _start_monitor(three.base, "k8s.io")
    try:
        containers = [pod.container for pod in three.pods.values()]
        wait_cri(lambda: all(f'container_id="{c}"' in _scrape(url) for c in containers),
                 "every container in clave-monitor's answer", timeout=30)
        text = _scrape(url)
        (three.base / "metrics.txt").write_text(text)  # for a failure's post-mortem
        for pod in three.pods.values():
            meta = pod.config.metadata
            labels = (f'container_id="{pod.container}",container="app",pod="{meta.name}",namespace="{meta.namespace}",'
                      f'uid="{meta.uid}",handler="{pod.label}"')
            info = _samples(text, "clave_container_info")
            assert info.get(f'{labels},status="running"') == 1, (labels, [k for k in info if pod.container in k])
            assert _samples(text, "clave_container_cpu_usage_seconds_total")[labels] > 0, pod.handler
            assert _samples(text, "clave_container_memory_working_set_bytes")[labels] > 0, pod.handler
            assert _samples(text, "clave_container_pids")[labels] >= 1, pod.handler
            assert _samples(text, "clave_container_oom_events_total")[labels] == 0, pod.handler
            for direction in ("receive", "transmit"):  # the pod's interface from CNI's bridge plugin
                family = f"clave_container_network_{direction}_bytes_total"
                assert f'{labels},interface="eth0"' in _samples(text, family), (family, pod.handler)
            assert _samples(text, "clave_monitor_shim_up")[f'containerd_namespace="k8s.io",shim="{pod.id}"'] == 1
        enclave = three.pods["clave-enclave"]
        assert any(k.startswith(f'container_id="{enclave.container}",') and 'type="wasm"' in k
                   for k in _samples(text, "clave_enclave_info")), "the enclave container's type"
        meta = enclave.config.metadata
        starts = _samples(text, "clave_enclave_starts_total")
        assert starts[f'pod="{meta.name}",namespace="{meta.namespace}",uid="{meta.uid}",handler="enclave",'
                      'type="wasm"'] == 1, starts
        vm = three.pods["clave-vm"]
        boots = {k: v for k, v in _samples(text, "clave_vm_boot_seconds").items()
                 if k.startswith(f'container_id="{vm.container}",')}
        assert len(boots) == 1 and list(boots.values())[0] > 0, boots
        assert 'handler="vm"' in list(boots)[0] and f'pod="{vm.config.metadata.name}"' in list(boots)[0]
        memory = [v for k, v in _samples(text, "clave_vm_vmm_memory_bytes").items()
                  if k.startswith(f'container_id="{vm.container}",')]
        assert memory and memory[0] > 0, "the VMM's resident memory"
    finally:
        stop_pid(monitor.pid)
        monitor.wait(timeout=10)


def test_clean_removal(three: Node) -> None:
    """StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox for each: nothing left, no QEMU."""
    from cri_harness import assert_nothing_left, wait_cri

    cri, pb = three.cri, three.cri.pb
    assert qemu_pids(three.vm_dir), "the vm pod's QEMU runs until the pod is removed"
    for pod in three.pods.values():
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=pod.container, timeout=10), timeout=60)
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=pod.container), timeout=60)
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
    wait_cri(lambda: not qemu_pids(three.vm_dir), "the vm pod's QEMU to exit")
    assert not os.path.exists(three.vm_dir), f"VM state left: {three.vm_dir}"
    assert_nothing_left(cri, [i for pod in three.pods.values() for i in (pod.id, pod.container)])
    left = cri.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
    assert not {p.id for p in left} & {pod.id for pod in three.pods.values()}
