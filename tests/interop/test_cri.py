"""Clave's shim behind containerd's CRI plugin, driven by a gRPC client built from the CRI v1 protos.

A private containerd runs with the CRI plugin and the runtime handler `clave` configured exactly as
docs/containerd.md documents it. The sandbox image is a static pause built here with gcc and the containers run a
busybox image built from Debian's busybox-static; both are OCI image tarballs written by hand and imported with
`ctr -n k8s.io image import` (no registry, no network). Pods use host networking (no CNI needed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cri"))
from cri_harness import (  # noqa: E402
    NAMESPACE,
    SERVE,
    Cri,
    assert_nothing_left,
    clave_shims,
    cni_config,
    container_status,
    create_and_start,
    ctr,
    daemon_config,
    parent_pid,
    running_cri,
    running_pod,
    wait_cri,
    write_oci_image,
)
from procs import cgroup_dirs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "containerd.md"


def documented_cri_config() -> str:
    """The ```toml block of docs/containerd.md: the CRI plugin section the test runs containerd with."""
    match = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"no toml block in {DOC}"
    return match.group(1)


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    """containerd with the CRI plugin configured exactly as docs/containerd.md documents it."""
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("grpc", reason="grpcio is a test dependency")
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    from clave.tools.bundles import BUSYBOX

    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not found: install Debian's busybox-static")
    base = Path(tmp_path_factory.mktemp("cri"))  # short: unix socket paths are limited to 108 bytes
    config = base / "config.toml"
    config.write_text(daemon_config(base) + documented_cri_config() + cni_config(base))
    with running_cri(base, config) as instance:
        yield instance


# --- tests --------------------------------------------------------------------------------------------------


def test_pod_lifecycle(cri: Cri) -> None:
    pb = cri.pb
    with running_pod(cri, "lifecycle") as (pod, sandbox):
        cid = create_and_start(cri, pod, sandbox, "app", SERVE)
        status, info = container_status(cri, cid)
        assert status.state == pb.CONTAINER_RUNNING
        assert info.get("runtimeType") == "io.containerd.clave.v2"
        bundle = cri.base / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / pod
        shim_socket = (bundle / "address").read_text().strip().removeprefix("unix://")

        result = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c",
                                      "echo out; echo err >&2; exit 3"], timeout=20), timeout=30)
        assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)

        stats = cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=30).stats
        assert stats.attributes.id == cid
        assert stats.memory.working_set_bytes.value > 0 or stats.memory.usage_bytes.value > 0
        assert stats.cpu.usage_core_nano_seconds.value > 0

        started = time.monotonic()
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=30)
        assert time.monotonic() - started < 8, "SIGTERM did not stop the container"
        status, _ = container_status(cri, cid)
        assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 0)
        log = (Path(sandbox.log_directory) / "app.log").read_text()
        assert "hello from sh" in log, log  # CRI's log format: "<time> stdout F hello from sh"

        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=30)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    assert_nothing_left(cri, [pod, cid])
    assert not os.path.exists(shim_socket), f"shim socket left: {shim_socket}"


def test_pod_sandbox_stats(cri: Cri) -> None:
    import grpc

    pb = cri.pb
    with running_pod(cri, "stats") as (pod, sandbox):
        cid = create_and_start(cri, pod, sandbox, "app", SERVE)
        try:
            stats = cri.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=30).stats
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                pytest.skip(f"this containerd's CRI has no PodSandboxStats: {exc.details()}")
            raise
        assert stats.attributes.id == pod
        assert stats.linux.memory.working_set_bytes.value > 0
        assert cid in [c.attributes.id for c in stats.linux.containers]
    assert_nothing_left(cri, [pod, cid])


def test_two_containers_share_the_pod_shim(cri: Cri) -> None:
    pb = cri.pb
    with running_pod(cri, "pair") as (pod, sandbox):
        first = create_and_start(cri, pod, sandbox, "first", SERVE)
        second = create_and_start(cri, pod, sandbox, "second", SERVE)
        shims = clave_shims(cri.address)
        assert len(shims) == 1, f"expected one shim for the pod, found {shims}"
        for cid in (first, second):
            status, info = container_status(cri, cid)
            assert status.state == pb.CONTAINER_RUNNING
            assert parent_pid(info["pid"]) == shims[0], f"{cid} is not a child of the pod's shim"
            out = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", cid], timeout=20),
                                       timeout=30)
            assert (out.stdout, out.exit_code) == (f"{cid}\n".encode(), 0)
        for cid in (first, second):
            cri.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=30)
            cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
        assert clave_shims(cri.address) == shims, "the shim must keep serving the sandbox"
    assert_nothing_left(cri, [pod, first, second])


def test_enclave_container_from_pod_annotations(cri: Cri, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A container whose CRI annotations ask for an enclave runs through the PAL (the documented
    container_annotations passes enclave.* into its OCI spec)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the skeleton PAL")
    pal_dir = tmp_path_factory.mktemp("pal")
    pal_dir.chmod(0o755)
    pal = pal_dir / "liberpal-skeleton.so"
    source = Path(__file__).resolve().parents[1] / "enclave" / "skeleton_pal.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-DPAL_API_VERSION=2", "-o", str(pal), str(source)], check=True)
    pb = cri.pb
    annotations = {"enclave.type": "software", "enclave.runtime.path": str(pal),
                   "enclave.runtime.args": "log=/proc/self/fd/1"}  # the PAL's call log goes to the CRI log
    with running_pod(cri, "enclave") as (pod, sandbox):
        cid = create_and_start(cri, pod, sandbox, "enclaved", "echo hello from the enclave", annotations)
        wait_cri(lambda: container_status(cri, cid)[0].state == pb.CONTAINER_EXITED, "the enclave app to exit")
        assert container_status(cri, cid)[0].exit_code == 0
        log = (Path(sandbox.log_directory) / "enclaved.log").read_text()
        assert "pal_init version=2" in log and "pal_create_process path=/bin/sh" in log, log
        assert "hello from the enclave" in log and "pal_destroy" in log, log
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
    assert_nothing_left(cri, [pod, cid])


def test_python_enclave_app_from_an_image(cri: Cri, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An ordinary image whose command is `python3 app.py` runs in the WebAssembly enclave when its CRI
    annotations say enclave.type=wasm; the app's signature travels in the image."""
    pytest.importorskip("wasmtime")
    from clave.enclave.wasm import interpreters
    from clave.tools import bundles

    try:
        interpreters.PYTHON.module_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    base = tmp_path_factory.mktemp("pyapp")
    bundle = base / "bundle"
    app = "import os\nprint('python in the enclave, cwd', os.getcwd(), open('motd.txt').read().strip())\n"
    bundles.make_app_bundle(str(bundle), {"/app/app.py": app, "/app/motd.txt": "from the image"},
                            ["python3", "app.py"], cwd="/app")
    clave = str(Path(sys.executable).parent / "clave")
    subprocess.run([clave, "enclave", "keygen", "--out", str(base / "key.pem")], check=True, capture_output=True)
    subprocess.run([clave, "enclave", "sign", "--key", str(base / "key.pem"), str(bundle)], check=True,
                   capture_output=True)
    image = "localhost/clave/pyapp:1"
    tar = write_oci_image(bundle / "rootfs", image, {"Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/app",
                                                     "Cmd": ["python3", "app.py"]}, base / "pyapp.tar")
    ctr(cri.address, "image", "import", str(tar))
    pb = cri.pb
    with running_pod(cri, "pyapp") as (pod, sandbox):
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="app"), image=pb.ImageSpec(image=image), log_path="app.log",
            annotations={"enclave.type": "wasm"},
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD))))
        cid = cri.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=config,
                                                                    sandbox_config=sandbox), timeout=60).container_id
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        wait_cri(lambda: container_status(cri, cid)[0].state == pb.CONTAINER_EXITED, "the app to exit", timeout=60)
        log = (Path(sandbox.log_directory) / "app.log").read_text()
        assert container_status(cri, cid)[0].exit_code == 0, log
        assert "python in the enclave, cwd /app from the image" in log, log
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
    assert_nothing_left(cri, [pod, cid])


@pytest.mark.parametrize("value", [1000, 2147483648, 4294967295])
def test_run_as_user_is_validated(cri: Cri, value: int) -> None:
    """A pod's runAsUser out of runc's range never runs: refused at CreateContainer (4294967295 would otherwise
    be -1 to setresuid and run as root). containerd 1.6 itself takes such a number for a user name and refuses
    it ("no users found") before the runtime sees it; a containerd that passes it on gets the shim's refusal,
    which names the field (test_shim.py drives the shim with these values directly)."""
    import grpc

    pb = cri.pb
    with running_pod(cri, f"uid{value}") as (pod, sandbox):
        if value <= 2147483647:
            cid = create_and_start(cri, pod, sandbox, "app", SERVE, run_as_user=pb.Int64Value(value=value),
                                    run_as_group=pb.Int64Value(value=value))
            result = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "id -u; id -g"],
                                                             timeout=20), timeout=30)
            assert result.stdout.split() == [str(value).encode()] * 2
            return
        with pytest.raises(grpc.RpcError) as err:
            create_and_start(cri, pod, sandbox, "app", SERVE, run_as_user=pb.Int64Value(value=value),
                              run_as_group=pb.Int64Value(value=0))  # a group: no /etc/passwd look-up
        details = err.value.details()
        assert "no users found" in details or ("process.user.uid" in details and "0-2147483647" in details)
    assert_nothing_left(cri, [pod])


def test_working_dir_through_a_leaked_fd_is_refused(cri: Cri) -> None:
    """CVE-2024-21626 through CRI: a pod spec's workingDir of /proc/self/fd/N never runs."""
    import grpc

    with running_pod(cri, "cwdleak") as (pod, sandbox):
        for fd in (3, 4, 5):
            with pytest.raises(grpc.RpcError) as err:
                create_and_start(cri, pod, sandbox, f"leak{fd}", "ls ../../../", working_dir=f"/proc/self/fd/{fd}")
            assert "cwd" in err.value.details(), err.value.details()
    assert_nothing_left(cri, [pod])


def test_list_containers_and_their_stats(cri: Cri) -> None:
    """ListContainers and ListContainerStats see a clave pod's containers, with every filter CRI defines."""
    pb = cri.pb
    with running_pod(cri, "listing") as (pod, sandbox):
        first = create_and_start(cri, pod, sandbox, "first", SERVE)
        second = create_and_start(cri, pod, sandbox, "second", SERVE)
        listed = cri.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
            pod_sandbox_id=pod)), timeout=30).containers
        assert {(c.id, c.metadata.name, c.state) for c in listed} == {
            (first, "first", pb.CONTAINER_RUNNING), (second, "second", pb.CONTAINER_RUNNING)}
        assert all(c.pod_sandbox_id == pod and c.image.image for c in listed)
        only = cri.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(id=second)),
                                          timeout=30).containers
        assert [c.id for c in only] == [second]
        exited = cri.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
            pod_sandbox_id=pod, state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED))), timeout=30).containers
        assert list(exited) == []

        stats = cri.runtime.ListContainerStats(pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(
            pod_sandbox_id=pod)), timeout=30).stats
        assert {s.attributes.id for s in stats} == {first, second}
        for s in stats:
            assert s.cpu.usage_core_nano_seconds.value > 0, s
            assert s.memory.working_set_bytes.value > 0 or s.memory.usage_bytes.value > 0, s
        one = cri.runtime.ListContainerStats(pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(
            id=first)), timeout=30).stats
        assert [s.attributes.id for s in one] == [first]
        assert one[0].attributes.metadata.name == "first"
    assert_nothing_left(cri, [pod, first, second])


def _cgroup_value(cgroups_path: str, v1_file: str, v2_file: str) -> str:
    """A resource file of a container's cgroup: cgroup v1/hybrid's controller file or cgroup v2's."""
    for directory in cgroup_dirs(cgroups_path.lstrip("/")):
        for name in (v1_file, v2_file):
            if (directory / name).exists():
                return (directory / name).read_text().strip()
    raise AssertionError(f"no {v1_file} or {v2_file} for cgroup {cgroups_path}")


def test_update_container_resources(cri: Cri) -> None:
    """UpdateContainerResources reaches the container's cgroup through the shim's Update."""
    pb = cri.pb
    with running_pod(cri, "update") as (pod, sandbox):
        cid = create_and_start(cri, pod, sandbox, "app", SERVE)
        _, info = container_status(cri, cid)
        cgroups_path = info["runtimeSpec"]["linux"]["cgroupsPath"]
        limit = 96 * 1024 * 1024
        cri.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=limit, cpu_period=100000,
                                                               cpu_quota=50000, cpu_shares=512)), timeout=30)
        assert _cgroup_value(cgroups_path, "memory.limit_in_bytes", "memory.max") == str(limit)
        quota = _cgroup_value(cgroups_path, "cpu.cfs_quota_us", "cpu.max")
        assert quota in ("50000", "50000 100000"), quota
        # The update changed nothing else: the container still runs and execs.
        result = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=20), timeout=30)
        assert result.exit_code == 0
        assert container_status(cri, cid)[0].state == pb.CONTAINER_RUNNING
    assert_nothing_left(cri, [pod, cid])


def test_reopen_container_log(cri: Cri) -> None:
    """After the log is rotated (renamed), ReopenContainerLog makes new output go to a new file at the path."""
    pb = cri.pb
    with running_pod(cri, "logs") as (pod, sandbox):
        cid = create_and_start(cri, pod, sandbox, "app", 'trap "exit 0" TERM; i=0; '
                               'while true; do i=$((i+1)); echo line $i; sleep 0.1; done')
        log = Path(sandbox.log_directory) / "app.log"
        wait_cri(lambda: log.exists() and "line 2" in log.read_text(), "the first lines in the log")
        rotated = log.with_suffix(".log.1")
        log.rename(rotated)
        cri.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid), timeout=30)
        wait_cri(lambda: log.exists() and "line" in log.read_text(), "lines in the reopened log")
        old, new = rotated.read_text(), log.read_text()
        last_old = int(old.strip().splitlines()[-1].split()[-1])
        first_new = int(new.strip().splitlines()[0].split()[-1])
        assert first_new > last_old, (old[-200:], new[:200])  # nothing written twice, the stream goes on
        assert new.splitlines()[0].split()[1:3] == ["stdout", "F"], new  # still CRI's log format
    assert_nothing_left(cri, [pod, cid])
