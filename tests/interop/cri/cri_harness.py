"""A private containerd with its CRI plugin, driven by a gRPC client generated from tests/interop/cri/api.proto,
for tests/interop/test_cri.py and tests/k8s (the node installer's pods): OCI image tarballs written by hand (a
static pause built with gcc, a busybox image from Debian's busybox-static) and imported with `ctr -n k8s.io image
import` (no registry, no network), host-network pods (no CNI), and teardown that removes the pods first (shims
outlive containerd), stops containerd and every Clave shim that served it by pid, and leaves no cgroup or mount.

Import it with tests/interop and tests/interop/cri on sys.path (test_cri.py and tests/k8s do)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import io
import json
import os
import platform
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

from procs import cgroup_dirs, process_argvs, stop_pid, wait_for

CRI_PROTO = Path(__file__).resolve().parent / "api.proto"
NAMESPACE = "k8s.io"  # CRI's containerd namespace
HANDLER = "clave"
BUSYBOX_IMAGE = "localhost/clave/busybox:1"
SHIM_BINARY = b"containerd-shim-clave-v2"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"

# Containers that stop on SIGTERM within a second (sh as pid 1 ignores signals it has no trap for).
SERVE = 'trap "exit 0" TERM; echo hello from $0; while true; do sleep 0.2; done'

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


# --- gRPC clients from .proto files -------------------------------------------------------------------------


def load_proto_modules(proto: Path, out: Path, root: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """Compile ``proto`` with grpcio-tools into ``out`` and import its ``_pb2`` and ``_pb2_grpc`` modules.
    ``root`` (default: the file's directory) is the include root: the file's name in protobuf's descriptor pool
    is relative to it, and one process must not register one name twice under two file names."""
    from grpc_tools import protoc

    root = root or proto.parent
    out.mkdir(exist_ok=True)
    status = protoc.main(["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)])
    assert status == 0, f"protoc failed on {proto}"
    module = proto.relative_to(root).with_suffix("").as_posix().replace("/", ".")
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module(f"{module}_pb2"), importlib.import_module(f"{module}_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def load_cri_modules(out: Path) -> tuple[ModuleType, ModuleType]:
    """The CRI client, from tests/interop/cri/api.proto."""
    return load_proto_modules(CRI_PROTO, out)


# --- a private containerd with CRI --------------------------------------------------------------------------


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
    config: Path
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


def daemon_config(base: Path) -> str:
    """containerd's own part of a private config (root, state, sockets under ``base``), before any plugin table."""
    address = base / "containerd.sock"
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
    )


def cni_config(base: Path) -> str:
    """An empty CNI set-up of our own (host-network pods need none; the plugin wants its directories)."""
    cni = base / "cni"
    (cni / "conf").mkdir(parents=True, exist_ok=True)
    (cni / "bin").mkdir(exist_ok=True)
    return (f'[plugins."{CRI_PLUGIN}".cni]\n'
            f'  bin_dir = "{cni / "bin"}"\n'
            f'  conf_dir = "{cni / "conf"}"\n')


def ctr(address: str, *args: str) -> None:
    result = subprocess.run(["ctr", "--address", address, "-n", NAMESPACE, *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr.strip()}"


@contextmanager
def running_cri(base: Path, config: Path, path: tuple[Path, ...] = ()) -> Iterator[Cri]:
    """containerd started with ``config`` (written with daemon_config(base)), answering CRI, with the pause image
    its config names and the busybox image imported; everything removed and stopped afterwards. containerd finds
    shims on its PATH: ``path``, then this interpreter's bin directory, then the caller's PATH."""
    import grpc

    from clave.tools.bundles import make_busybox_rootfs

    pb, pb_grpc = load_cri_modules(base / "gen")
    sandbox_image = tomllib.loads(config.read_text())["plugins"][CRI_PLUGIN]["sandbox_image"]
    pause_tar = write_oci_image(build_pause_rootfs(base), sandbox_image, {"Entrypoint": ["/pause"]},
                                base / "pause.tar")
    busybox = Path(make_busybox_rootfs(str(base / "busybox-rootfs")))
    busybox_tar = write_oci_image(busybox, BUSYBOX_IMAGE, {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                                  base / "busybox.tar")
    address = str(base / "containerd.sock")
    log_path = base / "containerd.log"
    dirs = [*map(str, path), str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
    env = dict(os.environ, PATH=":".join(dirs))
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)
    cgroup_parent = f"/clave-cri-{uuid.uuid4().hex[:8]}"
    channel = grpc.insecure_channel(f"unix://{address}")
    instance = Cri(pb, pb_grpc.RuntimeServiceStub(channel), address, base, cgroup_parent, base / "logs", config)
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
        ctr(address, "image", "import", str(pause_tar))
        ctr(address, "image", "import", str(busybox_tar))
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


# --- pods and containers ------------------------------------------------------------------------------------


def sandbox_config(cri: Cri, name: str) -> Any:
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
def running_pod(cri: Cri, name: str, handler: str = HANDLER) -> Iterator[tuple[str, Any]]:
    """RunPodSandbox with ``handler``; the pod is removed afterwards even if the test failed."""
    config = sandbox_config(cri, name)
    Path(config.log_directory).mkdir(parents=True)
    pod = cri.runtime.RunPodSandbox(cri.pb.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                    timeout=60).pod_sandbox_id
    cri.pods.append(pod)
    try:
        yield pod, config
    finally:
        cri.remove_pods()


def create_and_start(cri: Cri, pod: str, sandbox: Any, name: str, script: str,
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


def container_status(cri: Cri, cid: str) -> tuple[Any, dict[str, Any]]:
    response = cri.runtime.ContainerStatus(cri.pb.ContainerStatusRequest(container_id=cid, verbose=True),
                                           timeout=30)
    return response.status, json.loads(response.info.get("info", "{}"))


wait_cri = functools.partial(wait_for, timeout=15, interval=0.1)  # CRI calls settle slower


def parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def assert_nothing_left(cri: Cri, ids: list[str]) -> None:
    wait_cri(lambda: not clave_shims(cri.address), "the pod's shim to exit")
    for cid in ids:
        state = Path(f"/run/containerd/clave/{NAMESPACE}/{cid}")
        assert not state.exists(), f"engine state left: {state}"
        assert not [p for p in cgroup_dirs(cri.cgroup_parent.lstrip("/")) if list(p.rglob(f"{cid}"))], \
            f"cgroup left for {cid}"
        mounts = Path("/proc/self/mountinfo").read_text()
        assert cid not in mounts, f"mount left for {cid}"
