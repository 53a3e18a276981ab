"""Wire compatibility with containerd's own shim: drive containerd-shim-runc-v2 (Go ttrpc, gogo protobuf) with
Clave's ttrpc client and messages, and receive its events with Clave's ttrpc server standing in for containerd.

The shim is started exactly as containerd starts it (``start`` in the bundle directory, a ``log`` fifo there,
options on stdin); it prints its socket address and daemonizes. Teardown shuts it down and removes what it
left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clave.proto.generated import containerd_events as events
from clave.proto.generated import containerd_services_events_ttrpc_v1 as events_service
from clave.proto.generated import containerd_task_v2 as task
from clave.proto.generated import containerd_v1_types as types
from clave.proto.generated import google_protobuf
from clave.ttrpc import Client, Code, Context, Server, TtrpcError

SHIM = Path("/usr/bin/containerd-shim-runc-v2")
BUSYBOX = Path("/bin/busybox")
TASK = task.TaskService.NAME
SHIM_RUNC_ROOT = Path("/run/containerd/runc")

pytestmark = [
    pytest.mark.skipif(not SHIM.exists(), reason="containerd-shim-runc-v2 is not installed (Debian containerd)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the runc shim needs root"),
]


class Shim:
    def __init__(self, workdir: Path, namespace: str, container_id: str) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.id = container_id
        self.bundle = workdir / "bundle"
        self.containerd_address = str(workdir / "containerd.sock")  # only its ".ttrpc" sibling is used
        self.events: list[tuple[str, str, object]] = []
        self.events_changed = threading.Condition()
        self.address = ""
        self.pid = 0

    def forward(self, ctx: Context, request: events_service.ForwardRequest) -> google_protobuf.Empty:
        envelope = request.envelope
        assert envelope is not None and envelope.event is not None
        with self.events_changed:
            self.events.append((envelope.namespace, envelope.topic, envelope.event.unpack()))
            self.events_changed.notify_all()
        return google_protobuf.Empty()

    def wait_events(self, n: int, timeout: float = 10) -> list[tuple[str, str, object]]:
        with self.events_changed:
            self.events_changed.wait_for(lambda: len(self.events) >= n, timeout)
            return list(self.events)

    def start(self) -> str:
        log = self.bundle / "log"
        os.mkfifo(log)
        # containerd reads the shim's log fifo; without a reader the shim would block writing to it
        reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
        self.log_fd = reader
        args = [str(SHIM), "-namespace", self.namespace, "-address", self.containerd_address]
        args += ["-publish-binary", "/bin/true", "-id", self.id, "start"]
        # containerd tells shims where its ttrpc event service listens through TTRPC_ADDRESS
        env = {**os.environ, "TTRPC_ADDRESS": self.containerd_address + ".ttrpc"}
        out = subprocess.run(
            args, cwd=self.bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=20
        )
        assert out.returncode == 0, out.stderr.decode()
        self.address = out.stdout.decode().strip()
        return self.address

    def log(self) -> str:
        """What the shim logged so far (containerd would copy this into its own log)."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.log_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def cleanup(self) -> None:
        if self.address:
            try:
                with Client.connect(self.address, timeout=2) as client:
                    client.call(TASK, "Shutdown", task.ShutdownRequest(id=self.id, now=True).encode(), timeout=5)
            except TtrpcError:
                pass
        if self.pid:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
                time.sleep(0.05)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.address.startswith("unix:///"):
            Path(self.address[len("unix://") :]).unlink(missing_ok=True)
        if hasattr(self, "log_fd"):
            os.close(self.log_fd)
        shutil.rmtree(SHIM_RUNC_ROOT / self.namespace, ignore_errors=True)
        # After a failed test a `runc init` may be left in the container's cgroups; and on hybrid hosts runc
        # leaves the unified cgroup of a deleted container behind.
        cgroups = [*Path("/sys/fs/cgroup").glob(f"*/{self.id}"), Path("/sys/fs/cgroup") / self.id]
        for cgroup in cgroups:
            if not cgroup.is_dir():
                continue
            for pid in (cgroup / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(50):
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


@pytest.fixture
def shim() -> Iterator[Shim]:
    workdir = Path(tempfile.mkdtemp(prefix="clave-shim-"))  # short: unix socket paths are limited to 108 bytes
    suffix = uuid.uuid4().hex[:8]
    s = Shim(workdir, f"clave-ttrpc-{suffix}", f"interop-{suffix}")
    s.bundle.mkdir()
    events_server = Server()
    events_server.register(
        events_service.EventsService.NAME,
        {"Forward": lambda ctx, data: s.forward(ctx, events_service.ForwardRequest.decode(data)).encode()},
    )
    events_server.start(events_server.listen(s.containerd_address + ".ttrpc"))
    try:
        yield s
    finally:
        if hasattr(s, "log_fd"):
            print(f"shim log:\n{s.log()}")  # shown by pytest when the test fails
        s.cleanup()
        events_server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_connect_state_and_shutdown(shim: Shim) -> None:
    (shim.bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
    address = shim.start()
    assert address.startswith("unix:///run/containerd/s/")
    with Client.connect(address) as client:
        connected = client.invoke(TASK, "Connect", task.ConnectRequest(id=shim.id), task.ConnectResponse, timeout=5)
        shim.pid = connected.shim_pid
        assert connected.shim_pid > 1 and connected.task_pid == 0
        assert Path(f"/proc/{connected.shim_pid}/exe").resolve() == SHIM
        with pytest.raises(TtrpcError) as err:
            client.invoke(TASK, "State", task.StateRequest(id=shim.id), task.StateResponse, timeout=5)
        assert err.value.code == Code.NOT_FOUND  # containerd's errdefs travel as gRPC codes
        with pytest.raises(TtrpcError) as err:
            client.call(TASK, "NoSuchMethod", timeout=5)
        assert err.value.code == Code.UNIMPLEMENTED
        try:
            client.invoke(TASK, "Shutdown", task.ShutdownRequest(id=shim.id), google_protobuf.Empty, timeout=5)
        except TtrpcError as exc:
            # The Go shim may exit before its reply is written; containerd takes ttrpc.ErrClosed from Shutdown
            # as done, and so do we: the shim's exit below is what counts.
            assert exc.code == Code.UNAVAILABLE, exc
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{shim.pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{shim.pid}").exists(), "the shim did not exit after Shutdown"


@pytest.mark.skipif(not BUSYBOX.exists() or not shutil.which("runc"), reason="needs runc and busybox-static")
def test_container_lifecycle_and_events(shim: Shim) -> None:
    rootfs = shim.bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    subprocess.run(["runc", "spec"], cwd=shim.bundle, check=True)
    spec = json.loads((shim.bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/busybox", "sh", "-c", "echo hello from runc; exit 3"]
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["linux"]["cgroupsPath"] = f"/{shim.id}"
    (shim.bundle / "config.json").write_text(json.dumps(spec))
    stdout = shim.workdir / "stdout.txt"

    address = shim.start()
    with Client.connect(address) as client:
        shim.pid = client.invoke(TASK, "Connect", task.ConnectRequest(id=shim.id), task.ConnectResponse).shim_pid
        io_uri = f"file://{stdout}"  # the shim panics on file:// stdout with an empty stderr
        create = task.CreateTaskRequest(id=shim.id, bundle=str(shim.bundle), stdout=io_uri, stderr=io_uri)
        created = client.invoke(TASK, "Create", create, task.CreateTaskResponse, timeout=20)
        assert created.pid > 0
        state = client.invoke(TASK, "State", task.StateRequest(id=shim.id), task.StateResponse, timeout=5)
        assert (state.id, state.pid, state.status) == (shim.id, created.pid, types.Status.CREATED)
        assert state.bundle == str(shim.bundle)
        pids = client.invoke(TASK, "Pids", task.PidsRequest(id=shim.id), task.PidsResponse, timeout=5)
        assert [p.pid for p in pids.processes] == [created.pid]

        started = client.invoke(TASK, "Start", task.StartRequest(id=shim.id), task.StartResponse, timeout=20)
        assert started.pid == created.pid
        waited = client.invoke(TASK, "Wait", task.WaitRequest(id=shim.id), task.WaitResponse, timeout=20)
        assert waited.exit_status == 3 and waited.exited_at is not None
        assert abs(waited.exited_at.to_ns() - time.time_ns()) < 60e9
        state = client.invoke(TASK, "State", task.StateRequest(id=shim.id), task.StateResponse, timeout=5)
        assert (state.status, state.exit_status) == (types.Status.STOPPED, 3)
        assert state.exited_at == waited.exited_at
        deleted = client.invoke(TASK, "Delete", task.DeleteRequest(id=shim.id), task.DeleteResponse, timeout=20)
        assert (deleted.pid, deleted.exit_status) == (created.pid, 3)

    assert stdout.read_text() == "hello from runc\n"
    received = shim.wait_events(4)
    topics = [topic for _, topic, _ in received]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert {namespace for namespace, _, _ in received} == {shim.namespace}
    create_event, start_event, exit_event, delete_event = (event for _, _, event in received)
    assert isinstance(create_event, events.TaskCreate)
    assert (create_event.container_id, create_event.pid) == (shim.id, created.pid)
    assert create_event.bundle == str(shim.bundle)
    assert create_event.io is not None and create_event.io.stdout == f"file://{stdout}"
    assert start_event == events.TaskStart(container_id=shim.id, pid=created.pid)
    assert isinstance(exit_event, events.TaskExit)
    assert (exit_event.container_id, exit_event.id, exit_event.pid) == (shim.id, shim.id, created.pid)
    assert exit_event.exit_status == 3 and exit_event.exited_at == waited.exited_at
    assert isinstance(delete_event, events.TaskDelete)
    assert (delete_event.container_id, delete_event.pid, delete_event.exit_status) == (shim.id, created.pid, 3)
