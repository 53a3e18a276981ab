"""A CRI pod of the `clave-vm` runtime is one VM: containerd's CRI plugin runs with the runtime block that
docs/vm.md documents (the one `clave node install` writes), the pod's sandbox boots the VM and its containers
join it. Pods get their own network namespace from CNI's bridge plugin on a bridge of the test's own (no
traffic leaves the machine: no gateway, no masquerading); the interface reaches the guest as its NIC.
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
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cri"))
from cri_harness import (  # noqa: E402
    BUSYBOX_IMAGE,
    CRI_PLUGIN,
    NAMESPACE,
    SERVE,
    Cri,
    assert_nothing_left,
    daemon_config,
    running_cri,
    wait_cri,
)
from test_cri import documented_cri_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VM_DOC = REPO / "docs" / "vm.md"
CNI_BIN = Path("/usr/lib/cni")
RUNTIME = "clave-vm"


def documented_vm_runtime(prefix: Path) -> str:
    """docs/vm.md's containerd block, with ``prefix`` in place of /opt/clave."""
    match = re.search(r"```toml\n(.*?)```", VM_DOC.read_text(), re.S)
    assert match, f"no toml block in {VM_DOC}"
    return match.group(1).replace("/opt/clave", str(prefix))


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "gcc", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not (CNI_BIN / "bridge").exists():
        pytest.skip("CNI's loopback plugin is not installed (Debian's containernetworking-plugins)")
    pytest.importorskip("grpc", reason="grpcio is a test dependency")
    from clave.vm.guest import build_guest

    build_guest()  # cached: the guest the handler boots is the one of these sources
    base = Path(tmp_path_factory.mktemp("crivm"))
    prefix = base / "clave"
    (prefix / "etc").mkdir(parents=True)
    (prefix / "bin").mkdir()
    (prefix / "bin" / "containerd-shim-clave-v2").symlink_to(Path(sys.executable).parent / "containerd-shim-clave-v2")
    from clave.k8s import runtimeconfig

    (prefix / "etc" / f"runtime-{RUNTIME}.toml").write_text(
        runtimeconfig.render(runtimeconfig.RuntimeConfig(RUNTIME, "vm")))
    cni = base / "cni"
    (cni / "conf").mkdir(parents=True)
    bridge = f"clv{uuid.uuid4().hex[:8]}"
    network = {"cniVersion": "0.4.0", "name": "clave-vm-test", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": f"10.251.{os.getpid() % 250}.0/24", "dataDir": str(base / "ipam")}}]}
    (cni / "conf" / "10-test.conflist").write_text(json.dumps(network))
    cri_section = documented_cri_config()
    config = base / "config.toml"
    config.write_text(daemon_config(base) + cri_section + documented_vm_runtime(prefix)
                      + f'[plugins."{CRI_PLUGIN}".cni]\n  bin_dir = "{CNI_BIN}"\n  conf_dir = "{cni / "conf"}"\n')
    try:
        with running_cri(base, config) as instance:
            yield instance
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def pod_config(cri: Cri, name: str) -> Any:
    pb = cri.pb
    uid = uuid.uuid4().hex
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="clave-test", attempt=0),
        hostname=name,
        log_directory=str(cri.log_dir / uid),
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=f"{cri.cgroup_parent}/{uid}"),
    )


def start_container(cri: Cri, pod: str, sandbox: Any, name: str, script: str, memory: int = 0) -> str:
    pb = cri.pb
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=BUSYBOX_IMAGE),
        command=["sh", "-c", script], log_path=f"{name}.log",
        linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(memory_limit_in_bytes=memory)))
    cid = cri.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=config,
                                                                sandbox_config=sandbox), timeout=120).container_id
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def exec_sync(cri: Cri, cid: str, *cmd: str) -> tuple[int, str]:
    out = cri.runtime.ExecSync(cri.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=60), timeout=90)
    return out.exit_code, out.stdout.decode()


def vm_dir(container_id: str) -> str:
    """The VM state directory the clave shim's engine recorded for a container."""
    state = json.loads(Path(f"/run/containerd/clave/{NAMESPACE}/{container_id}/state.json").read_text())
    return str(state["handler_state"]["vm_dir"])


def qemu_pids(directory: str) -> list[int]:
    """QEMU processes of the VM whose state directory is ``directory``."""
    return [int(p) for p in subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 .*{directory}/"],
                                           capture_output=True, text=True).stdout.split()]


def test_a_pod_is_one_vm(cri: Cri) -> None:
    """RunPodSandbox boots the VM; two containers join it (one guest kernel, one boot id), ExecSync, stats and
    CRI-format logs work; an OOM kill in the guest is OOMKilled; removing the pod stops the VM."""
    pb = cri.pb
    sandbox = pod_config(cri, "vmpod")
    Path(sandbox.log_directory).mkdir(parents=True)
    pod = cri.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox, runtime_handler=RUNTIME),
                                    timeout=120).pod_sandbox_id
    cri.pods.append(pod)
    try:
        pod_vm = vm_dir(pod)
        assert len(qemu_pids(pod_vm)) == 1, "the pod's sandbox boots its VM"
        first = start_container(cri, pod, sandbox, "first", SERVE)
        second = start_container(cri, pod, sandbox, "second", SERVE)
        assert vm_dir(first) == vm_dir(second) == pod_vm, "the pod's containers must join its VM"
        boot_ids = set()
        for cid in (first, second):
            code, kernel = exec_sync(cri, cid, "uname", "-r")
            assert code == 0 and kernel.strip() != os.uname().release, kernel
            code, boot_id = exec_sync(cri, cid, "cat", "/proc/sys/kernel/random/boot_id")
            boot_ids.add(boot_id)
        assert len(boot_ids) == 1, "two containers of a pod run on one guest kernel"
        log = Path(sandbox.log_directory) / "first.log"
        wait_cri(lambda: log.exists() and "hello from" in log.read_text(), "the container's output in its log")
        assert re.match(r"\S+ stdout F hello from", log.read_text()), log.read_text()
        stats = cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=first), timeout=30).stats
        assert stats.cpu.usage_core_nano_seconds.value > 0 and stats.memory.working_set_bytes.value > 0, stats

        hog = start_container(cri, pod, sandbox, "hog", 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo $x',
                              memory=32 * 1024 * 1024)
        wait_cri(lambda: cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=hog), timeout=30)
                 .status.state == pb.CONTAINER_EXITED, "the memory hog to be killed", timeout=120)
        status = cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=hog), timeout=30).status
        assert (status.exit_code, status.reason) == (137, "OOMKilled"), status

        for cid in (first, second, hog):
            cri.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=60)
            cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
        assert len(qemu_pids(pod_vm)) == 1, "the VM lives as long as the pod"
    finally:
        cri.remove_pods()
    wait_cri(lambda: not qemu_pids(pod_vm), "the pod's VM to stop")
    assert not os.path.exists(pod_vm), f"VM state left: {pod_vm}"
    assert_nothing_left(cri, [pod])
