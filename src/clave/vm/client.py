"""The host side of the guest agent: typed calls over ttrpc on QEMU's chardev socket, and process stdio as
byte streams (see clave.vm.agent for the protocol)."""

from __future__ import annotations

import json
import os
import threading
import time

from clave.proto.generated import clave_agent_v1 as pb
from clave.proto.generated.google_protobuf import Empty
from clave.ttrpc import Client, TtrpcError
from clave.vm.errors import AgentError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from clave.proto import Message
    from clave.ttrpc import ClientStream

AGENT = pb.AgentServiceService.NAME
HEALTH = pb.HealthService.NAME
DEFAULT_TIMEOUT = 30.0
STDIN_CHUNK = 256 << 10


def blk_storage(serial: str, mount_point: str, fstype: str = "ext4", options: list[str] | None = None) -> pb.Storage:
    """A virtio-blk disk (found in the guest by its serial) mounted at ``mount_point`` (below /run)."""
    return pb.Storage(driver="blk", source=serial, fstype=fstype, options=list(options or []),
                      mount_point=mount_point)


class ProcessIO:
    """One process's stdio stream: write_stdin()/close_stdin(), and output delivered to ``on_output(fd, data)``
    by a reader thread, or collected (``stdout``, ``stderr``) when no callback is given."""

    def __init__(self, stream: ClientStream, on_output: Callable[[int, bytes], None] | None) -> None:
        self._stream = stream
        self._on_output = on_output
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.offsets = {1: 0, 2: 0}
        self.error: Exception | None = None
        self._stdin_open = True
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="vm-io", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for payload in self._stream:
                chunk = pb.IOChunk.decode(payload)
                if chunk.offset != self.offsets.get(chunk.fd, 0):
                    raise AgentError(f"stdio fd {chunk.fd}: chunk at offset {chunk.offset}, expected "
                                     f"{self.offsets.get(chunk.fd, 0)}")
                self.offsets[chunk.fd] = chunk.offset + len(chunk.data)
                if self._on_output is not None:
                    self._on_output(chunk.fd, chunk.data)
                else:
                    (self.stdout if chunk.fd == 1 else self.stderr).extend(chunk.data)
        except (TtrpcError, AgentError) as exc:
            self.error = exc

    def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            while view:
                self._stream.send(pb.IORequest(data=bytes(view[:STDIN_CHUNK])).encode())
                view = view[STDIN_CHUNK:]

    def close_stdin(self) -> None:
        """End of file on the process's stdin (after everything written before)."""
        with self._lock:
            if self._stdin_open:
                self._stdin_open = False
                self._stream.close_send()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every output byte arrived (the agent ended the stream)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AgentError("stdio stream still open")
        if self.error is not None:
            raise AgentError(f"stdio stream: {self.error}")


class AgentClient:
    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    def connect(cls, socket_path: str, timeout: float = 5.0) -> AgentClient:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(Client.connect(socket_path, timeout=timeout))
            except TtrpcError as exc:
                if time.monotonic() >= deadline:
                    raise AgentError(f"agent socket {socket_path}: {exc.message}", exc.code) from None
                time.sleep(0.005)

    @property
    def closed(self) -> bool:
        return self._client.closed

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, request: Message, response_type: type[Any] = Empty,
              timeout: float | None = DEFAULT_TIMEOUT, service: str = AGENT) -> Any:
        try:
            return self._client.invoke(service, method, request, response_type, timeout=timeout)
        except TtrpcError as exc:
            raise AgentError(f"agent {method}: {exc.message}", exc.code) from None

    # -- forwarding (clave.vm.host's proxy) ---------------------------------------------------------------------
    def forward(self, service: str, method: str, payload: bytes, timeout: float | None) -> bytes:
        """A call passed through unchanged (the agent's status, code and message included)."""
        return self._client.call(service, method, payload, timeout)

    def forward_stream(self, service: str, method: str, first: bytes) -> ClientStream:
        return self._client.stream(service, method, first, client_streams=True)

    # -- health -----------------------------------------------------------------------------------------------
    def ready(self, timeout: float = 0.25) -> bool:
        """True once the agent answers Health.Check as serving."""
        try:
            reply = self._client.invoke(HEALTH, "Check", pb.CheckRequest(), pb.HealthCheckResponse, timeout=timeout)
        except TtrpcError:
            return False
        return bool(reply.status == pb.ServingStatus.SERVING)

    def health(self, timeout: float = 5.0) -> int:
        reply = self._call("Check", pb.CheckRequest(), pb.HealthCheckResponse, timeout, HEALTH)
        return int(reply.status)

    def version(self) -> str:
        return str(self._call("Version", pb.CheckRequest(), pb.VersionCheckResponse, service=HEALTH).agent_version)

    def guest_details(self) -> pb.GuestDetailsResponse:
        return self._call("GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)

    # -- sandbox ----------------------------------------------------------------------------------------------
    def create_sandbox(self, sandbox_id: str, hostname: str = "", dns: list[str] | None = None,
                       storages: list[pb.Storage] | None = None, machine_id: str = "") -> None:
        """The pod's identity in the guest: hostname, resolv.conf, shared storages, and its machine id (32 hex
        digits, /etc/machine-id in the guest)."""
        self._call("CreateSandbox", pb.CreateSandboxRequest(sandbox_id=sandbox_id, hostname=hostname,
                                                            dns=list(dns or []), storages=list(storages or []),
                                                            machine_id=machine_id))

    def destroy_sandbox(self) -> None:
        self._call("DestroySandbox", pb.DestroySandboxRequest())

    def reseed_random(self, data: bytes | None = None) -> None:
        self._call("ReseedRandomDev", pb.ReseedRandomDevRequest(data=data or os.urandom(64)))

    def set_time(self, at_ns: int | None = None) -> None:
        ns = time.time_ns() if at_ns is None else at_ns
        self._call("SetGuestDateTime", pb.SetGuestDateTimeRequest(Sec=ns // 1_000_000_000,
                                                                  Usec=ns % 1_000_000_000 // 1000))

    # -- templates and measured boot --------------------------------------------------------------------------
    def set_disk_serials(self, serials: dict[str, str]) -> None:
        """Tell the guest which virtio-blk serial carries each host serial (a clone's disks sit in slots)."""
        self._call("SetDiskSerials", pb.SetDiskSerialsRequest(serials=dict(serials)))

    def warm_up(self) -> None:
        self._call("WarmUp", pb.WarmUpRequest(), timeout=120)

    def renew_tpm_identity(self, entropy: bytes | None = None) -> None:
        self._call("RenewTpmIdentity", pb.RenewTpmIdentityRequest(entropy=entropy or os.urandom(64)), timeout=60)

    def measure_container(self, container_id: str, image_digest: str) -> bytes:
        """Extend the container PCR with the image digest and the config the guest received (after
        create_container, before start_container); the PCR's new value."""
        reply = self._call("MeasureContainer", pb.MeasureContainerRequest(container_id=container_id,
                                                                          image_digest=image_digest),
                           pb.MeasureContainerResponse, timeout=120)
        return bytes(reply.value)

    def quote(self, nonce: bytes) -> tuple[bytes, bytes]:
        """(Clave TPM evidence bound to ``nonce``, the guest's event log); verify with clave-verify --tee tpm."""
        reply = self._call("GetQuote", pb.GetQuoteRequest(nonce=nonce), pb.GetQuoteResponse, timeout=120)
        return bytes(reply.evidence), bytes(reply.event_log)

    # -- containers -------------------------------------------------------------------------------------------
    def create_container(self, container_id: str, config: dict[str, Any], storages: list[pb.Storage]) -> None:
        """Create a container from its OCI config (root.path: a guest path, usually a storage's mount point)."""
        self._call("CreateContainer", pb.CreateContainerRequest(container_id=container_id, storages=storages,
                                                                oci_json=json.dumps(config)))

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", pb.StartContainerRequest(container_id=container_id))

    def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        self._call("ExecProcess", pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id,
                                                        process_json=json.dumps(process)))

    def attach_io(self, container_id: str, exec_id: str = "", stdin: bytes = b"",
                  on_output: Callable[[int, bytes], None] | None = None) -> ProcessIO:
        """Open the process's stdio stream; do it before starting the process."""
        first = pb.IORequest(container_id=container_id, exec_id=exec_id, data=stdin).encode()
        try:
            stream = self._client.stream(AGENT, "AttachIO", first, client_streams=True)
        except TtrpcError as exc:
            raise AgentError(f"agent AttachIO: {exc.message}", exc.code) from None
        return ProcessIO(stream, on_output)

    def signal_process(self, container_id: str, signal: int, exec_id: str = "") -> None:
        self._call("SignalProcess", pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id,
                                                            signal=signal))

    def wait_process(self, container_id: str, exec_id: str = "", timeout: float | None = None) -> int:
        """The exit status (128+N for signal N), after every output byte was sent."""
        reply = self._call("WaitProcess", pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id),
                           pb.WaitProcessResponse, timeout)
        return int(reply.status)

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self._call("CloseStdin", pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id))

    def resize_tty(self, container_id: str, rows: int, columns: int, exec_id: str = "") -> None:
        self._call("TtyWinResize", pb.TtyWinResizeRequest(container_id=container_id, exec_id=exec_id, row=rows,
                                                          column=columns))

    def remove_container(self, container_id: str, timeout: int = 10) -> None:
        self._call("RemoveContainer", pb.RemoveContainerRequest(container_id=container_id, timeout=timeout),
                   timeout=timeout + 5)

    def pause_container(self, container_id: str) -> None:
        self._call("PauseContainer", pb.PauseContainerRequest(container_id=container_id))

    def resume_container(self, container_id: str) -> None:
        self._call("ResumeContainer", pb.ResumeContainerRequest(container_id=container_id))

    def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        self._call("UpdateContainer", pb.UpdateContainerRequest(container_id=container_id,
                                                                resources_json=json.dumps(resources)))

    def stats_container(self, container_id: str) -> dict[str, Any]:
        """runc's ``events --stats`` data from inside the guest (cpu, memory, pids, blkio, network)."""
        reply = self._call("StatsContainer", pb.StatsContainerRequest(container_id=container_id),
                           pb.StatsContainerResponse)
        stats: dict[str, Any] = json.loads(reply.stats_json or "{}")
        return stats

    def oom_event(self, timeout: float | None = None) -> str:
        """Block until a container is OOM-killed inside the guest; its id."""
        return str(self._call("GetOOMEvent", pb.GetOOMEventRequest(), pb.OOMEvent, timeout).container_id)
