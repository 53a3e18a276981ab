"""One booted VM shared by this module: the agent, and busybox containers run inside the guest through it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from clave.proto.generated.clave_agent_v1 import ServingStatus
from clave.vm.accel import acceleration
from clave.vm.client import AgentClient, blk_storage
from clave.vm.errors import AgentError
from clave.vm.guest import Guest
from clave.vm.qemu import Vm
from tests.vm.conftest import MOUNTS, oci_config


def run(agent: AgentClient, cid: str, args: list[str], serial: str = "ctr2", stdin: bytes | None = None,
        timeout: float = 60) -> tuple[int, bytes, bytes]:
    """Create, attach, start, wait and remove a container; (status, stdout, stderr)."""
    agent.create_container(cid, oci_config(args, serial), [blk_storage(serial, f"{MOUNTS}/{serial}")])
    try:
        io = agent.attach_io(cid)
        if stdin is not None:
            io.write_stdin(stdin)
            io.close_stdin()
        agent.start_container(cid)
        status = agent.wait_process(cid, timeout=timeout)
        io.join(10)
        return status, bytes(io.stdout), bytes(io.stderr)
    finally:
        agent.remove_container(cid)


@pytest.fixture(scope="module")
def agent(vm: Vm) -> AgentClient:
    return vm.agent()


@pytest.fixture(scope="module")
def sleeper(vm: Vm, agent: AgentClient) -> Iterator[str]:
    """A long-running container (on disk ctr1) for exec and signal tests."""
    agent.create_container("sleeper", oci_config(["sleep", "1000"], "ctr1"), [blk_storage("ctr1", f"{MOUNTS}/ctr1")])
    io = agent.attach_io("sleeper")
    agent.start_container("sleeper")
    yield "sleeper"
    vm.agent().remove_container("sleeper")  # the VM's current connection (a test reconnects)
    try:
        io.join(10)
    except AgentError:
        assert agent.closed  # its stream went with the connection it was opened on


def test_boots_under_tcg_here_and_says_why_not_kvm(vm: Vm, guest: Guest) -> None:
    verdict = acceleration(guest)
    assert vm.accel == verdict.accel
    if verdict.accel == "tcg":
        assert verdict.reason  # "no /dev/kvm", or what QEMU did under KVM
        assert "tsc_early_khz=" in " ".join(vm.command("tcg"))
    t = vm.timings
    assert 0 < t.vmm_started <= t.kernel_up <= t.agent_ready


def test_health_and_version(agent: AgentClient) -> None:
    assert agent.health() == ServingStatus.SERVING
    assert agent.version()


def test_uname_inside_is_the_guest_kernel(agent: AgentClient, guest: Guest) -> None:
    status, out, _ = run(agent, "uname", ["uname", "-r"])
    assert status == 0
    assert out.decode().strip() == guest.kernel_release != os.uname().release


def test_exit_codes_and_stderr(agent: AgentClient) -> None:
    status, out, err = run(agent, "codes", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (status, out, err) == (7, b"out\n", b"err\n")
    # the container's init ignores signals it has no handler for, except from outside its pid namespace
    agent.create_container("killed", oci_config(["sleep", "100"], "ctr2"), [blk_storage("ctr2", f"{MOUNTS}/ctr2")])
    try:
        io = agent.attach_io("killed")
        agent.start_container("killed")
        agent.signal_process("killed", signal.SIGKILL)
        assert agent.wait_process("killed", timeout=20) == 128 + signal.SIGKILL
        io.join(10)
    finally:
        agent.remove_container("killed")


def test_megabytes_of_stdout_byte_for_byte(agent: AgentClient) -> None:
    count = 400_000  # ~2.7 MB of stdout and ~0.6 MB of stderr, interleaved
    status, out, err = run(agent, "bulk", ["sh", "-c", f"seq 1 {count}; seq 1 {count // 5} >&2; exit 3"])
    assert status == 3
    assert out == "".join(f"{i}\n" for i in range(1, count + 1)).encode()
    assert err == "".join(f"{i}\n" for i in range(1, count // 5 + 1)).encode()


def test_stdin_bytes_and_end_of_file_reach_the_process(agent: AgentClient) -> None:
    data = os.urandom(2 << 20)
    status, out, _ = run(agent, "cat", ["cat"], stdin=data)
    assert status == 0  # cat exits only at end of file
    assert out == data


def test_exec_wait_and_signal(agent: AgentClient, sleeper: str) -> None:
    agent.exec_process(sleeper, "e1", {"args": ["sh", "-c", "cat /proc/1/cmdline; exit 5"], "cwd": "/",
                                       "env": ["PATH=/bin:/sbin"], "user": {"uid": 0, "gid": 0}})
    # exec starts at ExecProcess: output waits in the pipe until the stream is attached
    io = agent.attach_io(sleeper, "e1")
    assert agent.wait_process(sleeper, "e1") == 5
    io.join(10)
    assert bytes(io.stdout) == b"sleep\x001000\x00"

    agent.exec_process(sleeper, "e2", {"args": ["sleep", "100"], "cwd": "/", "env": ["PATH=/bin"],
                                       "user": {"uid": 0, "gid": 0}})
    io = agent.attach_io(sleeper, "e2")
    agent.signal_process(sleeper, signal.SIGTERM, "e2")
    assert agent.wait_process(sleeper, "e2", timeout=20) == 128 + signal.SIGTERM
    io.join(10)


def test_stats_pause_resume(agent: AgentClient, sleeper: str) -> None:
    stats = agent.stats_container(sleeper)
    assert stats["pids"]["current"] >= 1
    assert stats["memory"]["usage"]["usage"] > 0
    agent.pause_container(sleeper)
    agent.resume_container(sleeper)


def test_update_close_stdin_and_sandbox_hostname(agent: AgentClient, sleeper: str) -> None:
    agent.create_sandbox("pod1", hostname="pod-one")
    agent.update_container(sleeper, {"pids": {"limit": 50}})
    assert agent.stats_container(sleeper)["pids"]["limit"] == 50
    agent.exec_process(sleeper, "e3", {"args": ["sh", "-c", "cat; hostname"], "cwd": "/", "env": ["PATH=/bin"],
                                       "user": {"uid": 0, "gid": 0}})
    io = agent.attach_io(sleeper, "e3")
    # The unary CloseStdin, as containerd's CloseIO: cat sees end of file. (Stdin data travels on the AttachIO
    # stream, a separate call that ttrpc does not order against this one: none is sent here.)
    agent.close_stdin(sleeper, "e3")
    assert agent.wait_process(sleeper, "e3", timeout=20) == 0
    io.join(10)
    # the container has its own UTS namespace (the spec's): its hostname, not the sandbox's
    assert bytes(io.stdout).strip() and b"pod-one" not in bytes(io.stdout)

def test_bad_requests_are_one_error(agent: AgentClient) -> None:
    with pytest.raises(AgentError, match="not found"):
        agent.start_container("nope")
    with pytest.raises(AgentError, match="no virtio-blk disk with serial"):
        agent.create_container("x", oci_config(["true"], "absent"), [blk_storage("absent", f"{MOUNTS}/absent")])
    # nothing was left behind: the same id can be created after the failure
    status, _, _ = run(agent, "x", ["true"])
    assert status == 0


def test_clock_and_random_reseed(agent: AgentClient) -> None:
    agent.set_time()
    agent.reseed_random()
    status, out, _ = run(agent, "date", ["date", "+%s"])
    assert status == 0
    assert abs(int(out) - time.time()) < 30


def test_terminal_with_resize(agent: AgentClient) -> None:
    config = oci_config(["sh", "-c", "stty size; tty"], "ctr3", terminal=True)
    agent.create_container("tty", config, [blk_storage("ctr3", f"{MOUNTS}/ctr3")])
    try:
        agent.resize_tty("tty", 30, 100)
        io = agent.attach_io("tty")
        agent.start_container("tty")
        assert agent.wait_process("tty", timeout=30) == 0
        io.join(10)
        lines = bytes(io.stdout).decode().split()
        assert lines[:2] == ["30", "100"]
        assert lines[2].startswith("/dev/pts/")
    finally:
        agent.remove_container("tty")


def test_qmp_stop_and_cont(vm: Vm, agent: AgentClient) -> None:
    qmp = vm.qmp()
    qmp.stop()
    assert qmp.query_status() == "paused"
    assert not agent.ready(timeout=0.5)  # a paused guest answers nothing
    qmp.cont()
    assert qmp.query_status() == "running"
    assert agent.health() == ServingStatus.SERVING


@pytest.mark.parametrize(("cid", "script", "limit"), [
    # the kernel's own OOM kill: a string that doubles until it cannot
    ("oom", "a=x; while true; do a=$a$a; done", 16 << 20),
    # no swap, a shell collecting 200 MB at 32 MiB: the kernel can reclaim and refault the container's program
    # text for minutes under TCG instead; the agent's PSI watch (clave.vm.agent.pressure) ends it as an OOM kill
    ("thrash", 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo $x', 32 << 20),
])
def test_oom_kill_inside_the_guest_is_an_oom_event(agent: AgentClient, cid: str, script: str, limit: int) -> None:
    config = oci_config(["sh", "-c", script], "ctr4")
    config["linux"]["resources"] = {"memory": {"limit": limit}}
    agent.create_container(cid, config, [blk_storage("ctr4", f"{MOUNTS}/ctr4")])
    try:
        io = agent.attach_io(cid)
        agent.start_container(cid)
        status = agent.wait_process(cid, timeout=90)
        io.join(10)
        assert status == 128 + signal.SIGKILL
        assert agent.oom_event(timeout=10) == cid
        assert agent.stats_container(cid)["oom_kills"] == 1
    finally:
        agent.remove_container(cid)


# Last in the module: it closes the connection the other tests share.
def test_agent_serves_the_next_host_connection_with_its_state(vm: Vm, agent: AgentClient, sleeper: str) -> None:
    # the host goes away in the middle of a flood of output (frames larger than one port write)
    agent.create_container("flood", oci_config(["yes", "x" * 100_000], "ctr2"),
                           [blk_storage("ctr2", f"{MOUNTS}/ctr2")])
    flood = agent.attach_io("flood")
    agent.start_container("flood")
    deadline = time.monotonic() + 30
    while flood.offsets[1] < 4 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.close()  # e.g. the host-side process restarted: the guest keeps its port and its containers
    fresh = vm.agent()
    assert fresh is not agent
    for _ in range(20):  # the new connection's framing is intact
        assert fresh.health() == ServingStatus.SERVING
    assert fresh.stats_container(sleeper)["pids"]["current"] >= 1
    fresh.remove_container("flood")
