"""``python3 -m clave.vm.agent``: the guest agent's main loop (started by the guest's /sbin/clave-init).

The agent channel is the first virtio-serial port (``/dev/vport*p1``: its number follows the device count).
QEMU's chardev serves one host connection at a time; the port stays open across them, so when the host goes
away (end of file) the agent waits for the next connection (a new host process, or a VM template's clone) and
serves it with the same state.
"""

from __future__ import annotations

import glob
import os
import select
import sys
import time

PORT_GLOB = "/dev/vport*p1"


def find_port(timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        ports = sorted(glob.glob(PORT_GLOB))
        if ports:
            return ports[0]
        if time.monotonic() >= deadline:
            raise SystemExit(f"clave-agent: no virtio-serial port ({PORT_GLOB})")
        time.sleep(0.01)


def wait_for_host(fd: int) -> None:
    """Block until the host side of the port is connected (POLLHUP clears)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        events = poller.poll(1000)
        if events and not any(ev & select.POLLHUP for _fd, ev in events):
            return
        time.sleep(0.02)  # disconnected ports report POLLHUP at once: do not spin


def _since_boot() -> str:
    """When the agent became ready after boot, and how long its Python took: boot-time diagnostics."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return f"{uptime:.2f} s after boot, Python start to ready {uptime - started:.2f} s"


def main() -> int:
    from clave.proto.generated import clave_agent_v1 as pb
    from clave.ttrpc import Server
    from clave.vm.agent.service import AgentService, HealthService

    # The reaper makes the agent a subreaper: orphans of containers come to it, not to the init shell.
    service = AgentService()
    service.start()
    server = Server()
    server.register_service(pb.AgentServiceService, service)
    server.register_service(pb.HealthService, HealthService())
    server.register_stream(pb.AgentServiceService.NAME, "AttachIO", service.io_stream)
    server.register_stream(pb.AgentServiceService.NAME, "FetchResources", service.fetch_resources)
    port = find_port()
    # non-blocking: a write while the host is away must fail, not wait for the next host (see FdChannel)
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    print(f"clave-agent: serving on {port} ({_since_boot()})", flush=True)
    while True:
        wait_for_host(fd)
        server.serve_fd(fd)


if __name__ == "__main__":
    sys.exit(main())
