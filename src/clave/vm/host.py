"""The host side of a running VM sandbox: one owner of the agent connection, and the processes that stand for
guest processes on the host.

QEMU's chardev serves one connection at a time, so one process owns it: the *VM host* (``VmHost``), which is
the shim for a pod it serves, or the container's keeper for `clave create` (conmon's role for runc). It serves
the agent's services again, unchanged, on a unix socket in the VM's state directory (``vm.sock``): every other
caller (`clave kill/exec/ps/stats...`, a stand-in) connects there with the same AgentClient.

A *stand-in* is a host process for one guest process, as the init is for a Linux container: its pid is the
one callers see (pid files, the runc shim's reaper, `docker top`), it copies its own stdio (or a host pty whose
master went to the caller's console socket) to and from the guest process as byte streams, passes the signals
it receives on (SIGWINCH becomes a tty resize), and exits with the guest process's status once every output
byte was written. A stand-in killed outright (SIGKILL cannot be passed on) takes its guest process with it:
the VM host sees the stream's connection drop and kills the process in the guest.
"""

from __future__ import annotations

import os
import signal
import threading

from clave.proto.generated import clave_agent_v1 as pb
from clave.ttrpc import Server, TtrpcError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from clave.ttrpc import Context, ServerStream
    from clave.vm.client import AgentClient
    from clave.vm.qemu import Vm

SOCKET = "vm.sock"
HOST = "clave.vm.Host"  # the VM host's own methods on vm.sock (JSON payloads): AddDisk, RemoveDisk
AGENT = pb.AgentServiceService.NAME
HEALTH = pb.HealthService.NAME
# Signals a stand-in passes on to its guest process (the rest keep their default action on the stand-in).
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGALRM)


class VmHost:
    """Owns a booted ``Vm``'s agent connection and serves it to other host processes on ``vm.sock``."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.server = Server()
        self.socket_path = vm.path(SOCKET)
        self._slots: list[str] = [""] * vm.config.hotplug_slots  # the serial of the disk in each slot
        self._lock = threading.Lock()

    def serve(self) -> None:
        """Start serving on ``vm.sock`` (background threads)."""
        streams = pb.AgentServiceService.STREAMS
        for name, methods in ((AGENT, pb.AgentServiceService.METHODS), (HEALTH, pb.HealthService.METHODS)):
            self.server.register(name, {m: self._forwarder(name, m) for m in methods if m not in streams})
        for method in streams:
            self.server.register_stream(AGENT, method, self._stream_forwarder(method))
        self.server.register(HOST, {"AddDisk": self._add_disk, "RemoveDisk": self._remove_disk})
        self.server.start(self.server.listen(self.socket_path, 0o600))

    def close(self) -> None:
        self.server.close()

    def _forwarder(self, service: str, method: str) -> Any:
        def forward(ctx: Context, payload: bytes) -> bytes:
            return self.vm.agent().forward(service, method, payload, ctx.time_remaining())

        return forward

    # -- disks of containers that join the VM after boot (PCIe hotplug on q35) ---------------------------------
    def _add_disk(self, ctx: Context, payload: bytes) -> bytes:
        import json

        from clave.ttrpc import Code
        from clave.vm.errors import VmError

        req = json.loads(payload)
        serial, path, readonly, fmt = req["serial"], req["path"], bool(req.get("readonly")), req.get("format", "raw")
        with self._lock:
            if "" not in self._slots:
                raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"the pod's VM has no free disk slot "
                                                          f"({len(self._slots)} in use)")
            slot = self._slots.index("")
            qmp = self.vm.qmp()
            try:
                qmp.execute("blockdev-add", {"node-name": f"n-{serial}", "driver": fmt, "read-only": readonly,
                                             "file": {"driver": "file", "filename": path, "read-only": readonly}})
                try:
                    qmp.execute("device_add", {"driver": "virtio-blk-pci", "drive": f"n-{serial}", "serial": serial,
                                               "bus": f"hp{slot}", "id": f"d-{serial}"})
                except VmError:
                    qmp.execute("blockdev-del", {"node-name": f"n-{serial}"})
                    raise
            except VmError as exc:
                raise TtrpcError(Code.INTERNAL, f"disk {serial}: {exc}") from None
            self._slots[slot] = serial
        return b"{}"

    def _remove_disk(self, ctx: Context, payload: bytes) -> bytes:
        import json
        import time

        from clave.vm.errors import VmError

        serial = json.loads(payload)["serial"]
        with self._lock:
            if serial not in self._slots:
                return b"{}"
            qmp = self.vm.qmp()
            try:
                qmp.execute("device_del", {"id": f"d-{serial}"})
                deadline = time.monotonic() + 10
                while not any(e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == f"d-{serial}"
                              for e in qmp.events) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    qmp.execute("query-status")  # reads the events that arrived meanwhile
                qmp.events.clear()
                qmp.execute("blockdev-del", {"node-name": f"n-{serial}"})
            except VmError:
                pass  # the guest did not let go: the disk goes with the VM
            self._slots[self._slots.index(serial)] = ""
        return b"{}"

    def _stream_forwarder(self, method: str) -> Any:
        """A streaming call passed through both ways. An AttachIO whose caller died (a stand-in killed outright)
        takes its guest process with it."""

        def forward(ctx: Context, stream: ServerStream) -> bytes:
            first = stream.recv()
            if first is None:
                return b""
            upstream = self.vm.agent().forward_stream(AGENT, method, first)

            def client_side() -> None:
                try:
                    while (data := stream.recv()) is not None:
                        upstream.send(data)
                    if stream.peer_lost and method == "AttachIO":
                        request = pb.IORequest.decode(first)
                        self.vm.agent().signal_process(request.container_id, signal.SIGKILL, request.exec_id)
                    else:
                        upstream.close_send()
                except (TtrpcError, OSError):
                    pass  # the process or the VM is gone already

            threading.Thread(target=client_side, name=f"vm-{method}", daemon=True).start()
            for chunk in upstream:
                stream.send(chunk)
            return upstream.response or b""

        return forward


def stand_in(agent: AgentClient, container_id: str, exec_id: str = "", process: dict[str, Any] | None = None,
             console_fd: int | None = None, report_fd: int = -1) -> NoReturn:
    """Become the stand-in of a guest process (in a forked child): exec it first when ``process`` is given,
    attach this process's stdio (or a new host pty whose master goes over ``console_fd``), tell ``report_fd``
    "ok" (or the error), then copy until the process ends and exit with its status."""
    try:
        tty = -1
        if process is not None:
            agent.exec_process(container_id, exec_id, process)
        if console_fd is not None:
            tty = _host_tty(console_fd)
        io = attach(agent, container_id, exec_id, tty)
    except Exception as exc:  # noqa: BLE001  # reported to the creating caller as one line
        _report(report_fd, f"error: {exc}")
        os._exit(1)
    _report(report_fd, "ok")
    os._exit(io.wait())


class Attached:
    """A guest process's stdio joined to host fds: ``wait()`` for its status once all output is out."""

    def __init__(self, agent: AgentClient, container_id: str, exec_id: str, tty: int) -> None:
        self.agent = agent
        self.container_id = container_id
        self.exec_id = exec_id
        self.tty = tty
        out = {1: tty, 2: tty} if tty >= 0 else {1: 1, 2: 2}
        self.stream = agent.attach_io(container_id, exec_id, on_output=lambda fd, data: _write_all(out[fd], data))
        threading.Thread(target=self._stdin, args=(tty if tty >= 0 else 0,), name="stdin", daemon=True).start()
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        if tty >= 0:
            signal.signal(signal.SIGWINCH, self._resize)
            self._resize(signal.SIGWINCH, None)

    def _stdin(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""  # EIO: the host pty's master is gone
            if not data:
                try:
                    self.stream.close_stdin()
                except TtrpcError:
                    pass
                return
            try:
                self.stream.write_stdin(data)
            except TtrpcError:
                return

    def _forward(self, sig: int, _frame: object) -> None:
        threading.Thread(target=self._signal, args=(sig,), daemon=True).start()  # not in the signal handler

    def _signal(self, sig: int) -> None:
        try:
            self.agent.signal_process(self.container_id, sig, self.exec_id)
        except TtrpcError:
            pass
        except Exception:  # noqa: BLE001  # the process or the VM is already gone
            pass

    def _resize(self, _sig: int, _frame: object) -> None:
        import fcntl
        import struct
        import termios

        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(self.tty, termios.TIOCGWINSZ, b"\0" * 8))
        if rows and cols:
            threading.Thread(target=self._send_size, args=(rows, cols), daemon=True).start()

    def _send_size(self, rows: int, cols: int) -> None:
        try:
            self.agent.resize_tty(self.container_id, rows, cols, self.exec_id)
        except Exception:  # noqa: BLE001  # a resize racing the process's end
            pass

    def wait(self) -> int:
        """The guest process's status (128+N for signal N), after every output byte was written here."""
        from clave.vm.errors import VmError

        try:
            status = self.agent.wait_process(self.container_id, self.exec_id)
            self.stream.join(30)
        except VmError:
            return 255
        return status


def attach(agent: AgentClient, container_id: str, exec_id: str = "", tty: int = -1) -> Attached:
    return Attached(agent, container_id, exec_id, tty)


def _host_tty(console_fd: int) -> int:
    """A host pty for a terminal process: its master goes to the caller (runc's console socket protocol), its
    slave becomes this process's controlling terminal (so resizes arrive as SIGWINCH), raw (the guest's pty
    does the line discipline)."""
    import fcntl
    import tty as ttymod

    from clave.linux import console

    master, slave = os.openpty()
    console.send_fd(console_fd, master, os.ttyname(slave))
    os.close(master)
    if os.getsid(0) != os.getpid():
        os.setsid()
    fcntl.ioctl(slave, console.TIOCSCTTY, 0)
    ttymod.setraw(slave)
    return slave


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        pass  # the reader went away: the process's output has nowhere to go


def _report(fd: int, message: str) -> None:
    if fd >= 0:
        try:
            os.write(fd, message.encode(errors="replace"))
        finally:
            os.close(fd)
