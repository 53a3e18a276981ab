"""Clave's shim behind containerd's CRI plugin, driven by a gRPC client built from the CRI v1 protos.

A private containerd runs with the CRI plugin and the runtime handler `clave` configured exactly as
docs/containerd.md documents it. The sandbox image is a static pause built here with gcc and the containers run a
busybox image built from Debian's busybox-static; both are OCI image tarballs written by hand and imported with
`ctr -n k8s.io image import` (no registry, no network). Pods use host networking (no CNI needed).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import cgroup_dirs, process_argvs, stop_pid, wait_for

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "containerd.md"
CRI_PROTO = Path(__file__).resolve().parent / "cri" / "api.proto"
NAMESPACE = "k8s.io"  # CRI's containerd namespace
HANDLER = "clave"
BUSYBOX_IMAGE = "localhost/clave/busybox:1"
SHIM_BINARY = b"containerd-shim-clave-v2"

PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


def documented_cri_config() -> str:
    """The ```toml block of docs/containerd.md: the CRI plugin section the test runs containerd with."""
    match = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"no toml block in {DOC}"
    return match.group(1)


# --- OCI image tarballs, written by hand --------------------------------------------------------------------


def _goarch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _tar_directory(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buffer.getvalue()


def write_oci_image(rootfs: Path, name: str, image_config: dict[str, Any], dest: Path) -> Path:
    """An OCI image layout tarball of one layer (``rootfs``), named ``name`` for containerd's importer."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer = _tar_directory(rootfs)
    layer_gz = gzip.compress(layer, mtime=0)
    config = {
        "architecture": _goarch(),
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(layer_gz, "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    manifest_descriptor = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_descriptor["platform"] = {"architecture": _goarch(), "os": "linux"}
    manifest_descriptor["annotations"] = {"io.containerd.image.name": name,
                                          "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_descriptor]}
    with tarfile.open(dest, "w") as tar:
        files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                 "index.json": json.dumps(index).encode()}
        files.update({f"blobs/sha256/{digest.split(':')[1]}": data for digest, data in blobs.items()})
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest


def build_pause_rootfs(work: Path) -> Path:
    source = work / "pause.c"
    source.write_text(PAUSE_C)
    rootfs = work / "pause-rootfs"
    rootfs.mkdir()
    subprocess.run(["gcc", "-static", "-O2", "-o", str(rootfs / "pause"), str(source)], check=True,
                   capture_output=True)
    return rootfs


# --- a private containerd with CRI --------------------------------------------------------------------------


def load_cri_modules(out: Path) -> tuple[ModuleType, ModuleType]:
    """Generate the CRI client from tests/interop/cri/api.proto with grpcio-tools and import it."""
    from grpc_tools import protoc

    out.mkdir(exist_ok=True)
    status = protoc.main(["protoc", f"-I{CRI_PROTO.parent}", f"--python_out={out}", f"--grpc_python_out={out}",
                          str(CRI_PROTO)])
    assert status == 0, "protoc failed on tests/interop/cri/api.proto"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def clave_shims(containerd_address: str) -> list[int]:
    """Pids of Clave shims working for one containerd (a server is a fork of `start`: same command line)."""
    found = []
    for pid, argv in process_argvs():
        if not any(os.path.basename(a) == SHIM_BINARY for a in argv[:3]) or b"-address" not in argv:
            continue
        if argv[argv.index(b"-address") + 1].decode() == containerd_address:
            found.append(pid)
    return found


@dataclass
class Cri:
    pb: ModuleType
    runtime: Any  # RuntimeServiceStub
    address: str
    base: Path
    cgroup_parent: str
    log_dir: Path
    pods: list[str] = field(default_factory=list)

    def remove_pods(self) -> None:
        """Stop and remove the pods the tests left (CRI calls these idempotent; a removed pod is NOT_FOUND)."""
        import grpc

        for pod in self.pods:
            try:
                self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
                self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        self.pods.clear()


def _config(base: Path, address: str) -> str:
    cni = base / "cni"
    (cni / "conf").mkdir(parents=True)
    (cni / "bin").mkdir()
    return (
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{base / "state"}"\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[ttrpc]\n"
        f'  address = "{address}.ttrpc"\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
        + documented_cri_config()
        + '[plugins."io.containerd.grpc.v1.cri".cni]\n'
        f'  bin_dir = "{cni / "bin"}"\n'
        f'  conf_dir = "{cni / "conf"}"\n'
    )


def _ctr(address: str, *args: str) -> None:
    result = subprocess.run(["ctr", "--address", address, "-n", NAMESPACE, *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr.strip()}"


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    grpc = pytest.importorskip("grpc", reason="grpcio is a test dependency")
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    from clave.tools.bundles import BUSYBOX, make_busybox_rootfs

    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not found: install Debian's busybox-static")
    base = Path(tmp_path_factory.mktemp("cri"))  # short: unix socket paths are limited to 108 bytes
    pb, pb_grpc = load_cri_modules(base / "gen")
    sandbox_image = tomllib.loads(documented_cri_config())["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"]
    pause_tar = write_oci_image(build_pause_rootfs(base), sandbox_image, {"Entrypoint": ["/pause"]},
                                base / "pause.tar")
    busybox = Path(make_busybox_rootfs(str(base / "busybox-rootfs")))
    busybox_tar = write_oci_image(busybox, BUSYBOX_IMAGE, {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                                  base / "busybox.tar")

    address = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text(_config(base, address))
    log_path = base / "containerd.log"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)
    cgroup_parent = f"/clave-cri-{uuid.uuid4().hex[:8]}"
    channel = grpc.insecure_channel(f"unix://{address}")
    instance = Cri(pb, pb_grpc.RuntimeServiceStub(channel), address, base, cgroup_parent, base / "logs")
    try:
        deadline = time.monotonic() + 20
        while True:
            assert daemon.poll() is None, f"containerd exited: {log_path.read_text()[-2000:]}"
            try:
                version = instance.runtime.Version(pb.VersionRequest(version="v1"), timeout=2)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, f"CRI did not answer: {log_path.read_text()[-2000:]}"
                time.sleep(0.2)
        assert version.runtime_name == "containerd"
        _ctr(address, "image", "import", str(pause_tar))
        _ctr(address, "image", "import", str(busybox_tar))
        yield instance
    finally:
        try:
            if daemon.poll() is None:
                instance.remove_pods()  # shims outlive containerd: remove pods first
        finally:
            channel.close()
            stop_pid(daemon.pid)
            daemon.wait(timeout=10)
            for pid in clave_shims(address):
                stop_pid(pid)
            for leftover in cgroup_dirs(cgroup_parent.lstrip("/")):
                for child in sorted(leftover.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if child.is_dir():
                        child.rmdir()
                leftover.rmdir()
            subprocess.run(["umount", "-R", str(base / "root")], capture_output=True)
            subprocess.run(["umount", "-R", str(base / "state")], capture_output=True)
            try:  # the clave shim's engine root for the CRI namespace, empty once every pod is gone
                os.rmdir(f"/run/containerd/clave/{NAMESPACE}")
            except OSError:
                pass


# --- helpers ------------------------------------------------------------------------------------------------


def _sandbox_config(cri: Cri, name: str) -> Any:
    pb = cri.pb
    uid = uuid.uuid4().hex
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="clave-test", attempt=0),
        log_directory=str(cri.log_dir / uid),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=f"{cri.cgroup_parent}/{uid}",
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD))),
    )


@contextmanager
def running_pod(cri: Cri, name: str) -> Iterator[tuple[str, Any]]:
    """RunPodSandbox with handler `clave`; the pod is removed afterwards even if the test failed."""
    config = _sandbox_config(cri, name)
    Path(config.log_directory).mkdir(parents=True)
    pod = cri.runtime.RunPodSandbox(cri.pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER),
                                    timeout=60).pod_sandbox_id
    cri.pods.append(pod)
    try:
        yield pod, config
    finally:
        cri.remove_pods()


def _create_and_start(cri: Cri, pod: str, sandbox: Any, name: str, script: str,
                      annotations: dict[str, str] | None = None, working_dir: str = "",
                      **security: Any) -> str:
    """CreateContainer + StartContainer; ``security`` adds LinuxContainerSecurityContext fields (run_as_user...)."""
    pb = cri.pb
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=BUSYBOX_IMAGE),
        command=["sh", "-c", script],
        working_dir=working_dir,
        log_path=f"{name}.log",
        annotations=annotations or {},
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD), **security)),
    )
    cid = cri.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod, config=config,
                                                                sandbox_config=sandbox), timeout=60).container_id
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def _status(cri: Cri, cid: str) -> tuple[Any, dict[str, Any]]:
    response = cri.runtime.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=cid, verbose=True),
                                           timeout=30)
    return response.status, json.loads(response.info.get("info", "{}"))


_wait_for = functools.partial(wait_for, timeout=15, interval=0.1)  # CRI calls settle slower


def _parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def _assert_nothing_left(cri: Cri, ids: list[str]) -> None:
    _wait_for(lambda: not clave_shims(cri.address), "the pod's shim to exit")
    for cid in ids:
        state = Path(f"/run/containerd/clave/{NAMESPACE}/{cid}")
        assert not state.exists(), f"engine state left: {state}"
        assert not [p for p in cgroup_dirs(cri.cgroup_parent.lstrip("/")) if list(p.rglob(f"{cid}"))], \
            f"cgroup left for {cid}"
        mounts = Path("/proc/self/mountinfo").read_text()
        assert cid not in mounts, f"mount left for {cid}"


# Containers that stop on SIGTERM within a second (sh as pid 1 ignores signals it has no trap for).
SERVE = 'trap "exit 0" TERM; echo hello from $0; while true; do sleep 0.2; done'


# --- tests --------------------------------------------------------------------------------------------------


def test_pod_lifecycle(cri: Cri) -> None:
    pb = cri.pb
    with running_pod(cri, "lifecycle") as (pod, sandbox):
        cid = _create_and_start(cri, pod, sandbox, "app", SERVE)
        status, info = _status(cri, cid)
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
        status, _ = _status(cri, cid)
        assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 0)
        log = (Path(sandbox.log_directory) / "app.log").read_text()
        assert "hello from sh" in log, log  # CRI's log format: "<time> stdout F hello from sh"

        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=30)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    _assert_nothing_left(cri, [pod, cid])
    assert not os.path.exists(shim_socket), f"shim socket left: {shim_socket}"


def test_pod_sandbox_stats(cri: Cri) -> None:
    import grpc

    pb = cri.pb
    with running_pod(cri, "stats") as (pod, sandbox):
        cid = _create_and_start(cri, pod, sandbox, "app", SERVE)
        try:
            stats = cri.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=30).stats
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                pytest.skip(f"this containerd's CRI has no PodSandboxStats: {exc.details()}")
            raise
        assert stats.attributes.id == pod
        assert stats.linux.memory.working_set_bytes.value > 0
        assert cid in [c.attributes.id for c in stats.linux.containers]
    _assert_nothing_left(cri, [pod, cid])


def test_two_containers_share_the_pod_shim(cri: Cri) -> None:
    pb = cri.pb
    with running_pod(cri, "pair") as (pod, sandbox):
        first = _create_and_start(cri, pod, sandbox, "first", SERVE)
        second = _create_and_start(cri, pod, sandbox, "second", SERVE)
        shims = clave_shims(cri.address)
        assert len(shims) == 1, f"expected one shim for the pod, found {shims}"
        for cid in (first, second):
            status, info = _status(cri, cid)
            assert status.state == pb.CONTAINER_RUNNING
            assert _parent_pid(info["pid"]) == shims[0], f"{cid} is not a child of the pod's shim"
            out = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", cid], timeout=20),
                                       timeout=30)
            assert (out.stdout, out.exit_code) == (f"{cid}\n".encode(), 0)
        for cid in (first, second):
            cri.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10), timeout=30)
            cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
        assert clave_shims(cri.address) == shims, "the shim must keep serving the sandbox"
    _assert_nothing_left(cri, [pod, first, second])


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
        cid = _create_and_start(cri, pod, sandbox, "enclaved", "echo hello from the enclave", annotations)
        _wait_for(lambda: _status(cri, cid)[0].state == pb.CONTAINER_EXITED, "the enclave app to exit")
        assert _status(cri, cid)[0].exit_code == 0
        log = (Path(sandbox.log_directory) / "enclaved.log").read_text()
        assert "pal_init version=2" in log and "pal_create_process path=/bin/sh" in log, log
        assert "hello from the enclave" in log and "pal_destroy" in log, log
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
    _assert_nothing_left(cri, [pod, cid])


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
    _ctr(cri.address, "image", "import", str(tar))
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
        _wait_for(lambda: _status(cri, cid)[0].state == pb.CONTAINER_EXITED, "the app to exit", timeout=60)
        log = (Path(sandbox.log_directory) / "app.log").read_text()
        assert _status(cri, cid)[0].exit_code == 0, log
        assert "python in the enclave, cwd /app from the image" in log, log
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=30)
    _assert_nothing_left(cri, [pod, cid])


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
            cid = _create_and_start(cri, pod, sandbox, "app", SERVE, run_as_user=pb.Int64Value(value=value),
                                    run_as_group=pb.Int64Value(value=value))
            result = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "id -u; id -g"],
                                                             timeout=20), timeout=30)
            assert result.stdout.split() == [str(value).encode()] * 2
            return
        with pytest.raises(grpc.RpcError) as err:
            _create_and_start(cri, pod, sandbox, "app", SERVE, run_as_user=pb.Int64Value(value=value),
                              run_as_group=pb.Int64Value(value=0))  # a group: no /etc/passwd look-up
        details = err.value.details()
        assert "no users found" in details or ("process.user.uid" in details and "0-2147483647" in details)
    _assert_nothing_left(cri, [pod])


def test_working_dir_through_a_leaked_fd_is_refused(cri: Cri) -> None:
    """CVE-2024-21626 through CRI: a pod spec's workingDir of /proc/self/fd/N never runs."""
    import grpc

    with running_pod(cri, "cwdleak") as (pod, sandbox):
        for fd in (3, 4, 5):
            with pytest.raises(grpc.RpcError) as err:
                _create_and_start(cri, pod, sandbox, f"leak{fd}", "ls ../../../", working_dir=f"/proc/self/fd/{fd}")
            assert "cwd" in err.value.details(), err.value.details()
    _assert_nothing_left(cri, [pod])
