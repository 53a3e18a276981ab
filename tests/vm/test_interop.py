"""vm containers through every caller: containerd's runc.v2 shim with `--runc-binary clave`, Clave's own shim
with ctr (exec with and without a tty, the tty's size, kill, metrics v2 from the guest, stdio byte for byte,
QEMU killed → TaskExit), podman with `--runtime-flag handler=vm`, Docker with a runtime whose runtimeArgs are
["--handler", "vm"]. The private containerd, podman and dockerd fixtures of tests/interop are reused.

Each check shows the container ran in a VM: `uname -r` inside is the guest's kernel, not the host's."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

INTEROP = str(Path(__file__).resolve().parents[1] / "interop")
if INTEROP not in sys.path:
    sys.path.insert(0, INTEROP)  # tests/interop is not a package: its modules import each other top-level


def _interop_conftest() -> Any:
    """tests/interop/conftest.py by its path: in a whole-suite run the module named "conftest" is whichever
    directory's conftest was imported last; test_docker imports it by that name, so it is put there meanwhile."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("interop_conftest", os.path.join(INTEROP, "conftest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["interop_conftest"] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


_conftest = _interop_conftest()
_previous = sys.modules.get("conftest")
sys.modules["conftest"] = _conftest
try:
    from test_docker import IMAGE, Docker, docker  # noqa: E402
    from test_podman import IMAGE as PODMAN_IMAGE  # noqa: E402
    from test_podman import Podman, podman  # noqa: E402
finally:
    if _previous is not None:
        sys.modules["conftest"] = _previous
Containerd = _conftest.Containerd
busybox_rootfs, clave, containerd = _conftest.busybox_rootfs, _conftest.clave, _conftest.containerd

from clave.vm.guest import Guest  # noqa: E402
from tests.vm.test_handler import _subreaper, assert_gone, trace, vm_guest, wait_for  # noqa: E402

__all__ = ["_subreaper", "busybox_rootfs", "clave", "containerd", "docker", "podman", "vm_guest"]  # fixtures
SHIM = "io.containerd.clave.v2"
ANNOTATION = ["--annotation", "io.clave.handler=vm"]
MIB = 1 << 20
# podman asks for limits of 1048576 by default; without CAP_SYS_RESOURCE here, ask for what the host allows
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
SERVICE = ["sh", "-c", "uname -r; trap 'exit 0' TERM; while :; do sleep 0.1; done"]


def _id(prefix: str) -> str:
    return f"vm{prefix}-{uuid.uuid4().hex[:6]}"


def _ctr(containerd: Containerd, *args: str, input: bytes | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ctr", "--address", containerd.address, "-n", containerd.namespace, *args], input=input,
                          capture_output=True, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def _task_status(containerd: Containerd, cid: str) -> str:
    for line in containerd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return ""


def _byte_exact_script() -> list[str]:
    return ["sh", "-c", "cat > /dev/shm/in; cat /dev/shm/in; cat /dev/shm/in >&2; uname -r >&2; exit 3"]


def test_runc_shim_with_clave_as_runc_binary(containerd: Containerd, clave: Path, busybox_rootfs: Path,
                                            vm_guest: Guest) -> None:
    """`ctr run --runc-binary clave --annotation io.clave.handler=vm`: stdin to EOF, megabytes back on stdout and
    stderr byte for byte, the exit code; the runtime's state, the VM, its layer and the shim are gone after."""
    cid = _id("runc")
    data = os.urandom(2 * MIB + 321)
    with tempfile.TemporaryFile() as stdin:
        stdin.write(data)
        stdin.seek(0)
        proc = subprocess.Popen(["ctr", "--address", containerd.address, "-n", containerd.namespace, "run", "--rm",
                                 "--runc-binary", str(clave), *ANNOTATION, "--rootfs", str(busybox_rootfs), cid,
                                 *_byte_exact_script()], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        t = trace(containerd.runc_root, cid, timeout=120)
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, err[-300:]
    assert out == data, f"stdout: {len(out)} bytes for {len(data)}"
    assert err == data + f"{vm_guest.kernel_release}\n".encode(), f"stderr: {len(err)} bytes, ends {err[-80:]!r}"
    assert_gone(t)
    assert cid not in containerd.task_ids() and cid not in containerd.container_ids()
    wait_for(lambda: not containerd.shims(cid), "the shim to exit")


def test_clave_shim_exec_tty_kill_metrics_and_qemu_killed(containerd: Containerd, busybox_rootfs: Path,
                                                           vm_guest: Guest) -> None:
    cid = _id("shim")
    run = _ctr(containerd, "run", "-d", "--runtime", SHIM, *ANNOTATION, "--rootfs", str(busybox_rootfs), cid,
               *SERVICE)
    assert run.returncode == 0, run.stderr
    t = trace(Path(f"/run/containerd/clave/{containerd.namespace}"), cid, timeout=120)
    events_out = tempfile.TemporaryFile("w+")
    watcher = subprocess.Popen(["ctr", "--address", containerd.address, "events"], stdout=events_out,
                               stderr=subprocess.DEVNULL)
    try:
        assert _task_status(containerd, cid) == "RUNNING"
        # exec without a tty: output, exit code, the guest's kernel; stdin to EOF and megabytes byte for byte
        done = _ctr(containerd, "task", "exec", "--exec-id", "e1", cid, "sh", "-c", "uname -r; echo e >&2; exit 5")
        assert (done.returncode, done.stdout, done.stderr) == (5, f"{vm_guest.kernel_release}\n".encode(), b"e\n")
        data = os.urandom(2 * MIB + 99)
        done = _ctr(containerd, "task", "exec", "--exec-id", "e2", cid, *_byte_exact_script(), input=data)
        assert done.returncode == 3 and done.stdout == data, (done.returncode, len(done.stdout))
        assert done.stderr == data + f"{vm_guest.kernel_release}\n".encode(), len(done.stderr)

        # exec with a tty: ctr's terminal size reaches the guest's pty (ctr resizes after the process started, as
        # with any runtime: the process looks a moment later)
        status, text = _ctr_in_pty(containerd, "task", "exec", "-t", "--exec-id", "t1", cid, "sh", "-c",
                                   "tty; sleep 1; stty size; exit 4")
        assert status == 4 and "/dev/pts/" in text and "33 101" in text, text

        # kill an exec'd process: its status is 128+9
        sleeper = subprocess.Popen(["ctr", "--address", containerd.address, "-n", containerd.namespace, "task",
                                    "exec", "--exec-id", "k1", cid, "sleep", "1000"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def exec_started() -> bool:
            events_out.seek(0)
            return any("/tasks/exec-started" in line and "k1" in line for line in events_out) or \
                sleeper.poll() is not None

        wait_for(exec_started, "the exec'd sleep to start", timeout=60)
        ps = containerd.ctr("task", "ps", cid, check=True).stdout.split()
        assert len([p for p in ps if p.isdigit()]) >= 2, ps  # the init's and the sleep's stand-ins
        kill = containerd.ctr("task", "kill", "--exec-id", "k1", "-s", "SIGKILL", cid)
        assert kill.returncode == 0, kill.stderr
        assert sleeper.wait(timeout=60) == 128 + signal.SIGKILL

        # metrics v2 from inside the guest
        metrics = json.loads(containerd.ctr("task", "metrics", "--format", "json", cid, check=True).stdout)
        data_v2: dict[str, Any] = metrics.get("Data") or metrics.get("data") or metrics  # ctr prints the data
        flat = json.dumps(data_v2).lower()
        assert data_v2, metrics
        for key in ("pids", "cpu", "memory", "io"):
            assert f'"{key}"' in flat, (key, data_v2)
        assert _deep(data_v2, "pids", "current") >= 1 and _deep(data_v2, "cpu", "usage_usec") > 0
        assert _deep(data_v2, "memory", "usage") > 0

        # QEMU killed: the task stops with a status and TaskExit is published
        os.kill(t.qemu, signal.SIGKILL)
        wait_for(lambda: _task_status(containerd, cid) == "STOPPED", "the task to stop", timeout=60)
        time.sleep(0.5)
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
        containerd.ctr("task", "delete", "--force", cid)
        containerd.ctr("container", "delete", cid)
    events_out.seek(0)
    topics = [next(f for f in line.split() if f.startswith("/")) for line in events_out if cid in line]
    assert "/tasks/exit" in topics, topics
    assert_gone(t, timeout=30)
    wait_for(lambda: not containerd.shims(cid), "the shim to exit")


def _deep(doc: dict[str, Any], section: str, name: str) -> int:
    """A value of containerd's metrics v2 in ctr's JSON (field names as protobuf's JSON or Go's give them)."""
    part = {k.lower(): v for k, v in doc.items()}.get(section, {})
    for key, value in part.items():
        if key.lower().replace("_", "") == name.replace("_", ""):
            return int(value)
    raise AssertionError(f"no {section}.{name} in {doc}")


def _ctr_in_pty(containerd: Containerd, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run ctr with a 33x101 pty as its terminal; its exit code and what it printed."""
    pid, fd = pty.fork()
    if pid == 0:
        import fcntl

        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        os.execvp("ctr", ["ctr", "--address", containerd.address, "-n", containerd.namespace, *args])
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace").replace("\r\n", "\n")


# podman and Docker set net.* sysctls (ping_group_range, ip_unprivileged_port_start) on every container: the
# guest agent sets them in the guest's network namespace, the pod's (as Kata's agent does).


def test_podman_runtime_flag_selects_vm(podman: Podman, vm_guest: Guest) -> None:
    name = f"vm-{uuid.uuid4().hex[:6]}"
    vm = ["--runtime-flag", "handler=vm"]  # podman 4.3: a global flag, given to the runtime as --handler=vm
    container_id = podman(*vm, "run", "-d", "--name", name, "--network", "none", *ULIMITS, PODMAN_IMAGE,
                          *SERVICE, timeout=180).stdout.strip()
    try:
        wait_for(lambda: vm_guest.kernel_release in podman(*vm, "logs", name).stdout, "the init's output")
        done = podman(*vm, "exec", name, "sh", "-c", "uname -r; echo e >&2; exit 4", check=False)
        assert (done.returncode, done.stdout, done.stderr) == (4, f"{vm_guest.kernel_release}\n", "e\n")
        state = subprocess.run([str(Path(sys.executable).with_name("clave")), "state", container_id],
                               capture_output=True, text=True, check=True)
        assert "vm" in json.loads(state.stdout)
        started = time.monotonic()
        podman(*vm, "stop", name, timeout=60)
        assert time.monotonic() - started < 10, "the container should stop on SIGTERM"
        assert podman(*vm, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.strip() \
            == "exited 0"
    finally:
        podman(*vm, "rm", "--force", "--time", "0", name, check=False)
    listing = subprocess.run([str(Path(sys.executable).with_name("clave")), "list", "--quiet"], capture_output=True,
                             text=True).stdout.split()
    assert container_id not in listing


@pytest.fixture(scope="module")
def docker_vm(docker: Docker) -> Iterator[Docker]:
    """The private dockerd with one more runtime, clave-vm (runtimeArgs --handler vm), loaded by SIGHUP."""
    config = docker.base / "daemon.json"
    doc = json.loads(config.read_text())
    clave_path = doc["runtimes"]["clave"]["path"]
    doc["runtimes"]["clave-vm"] = {"path": clave_path, "runtimeArgs": ["--handler", "vm"]}
    config.write_text(json.dumps(doc))
    os.kill(docker.pid, signal.SIGHUP)
    wait_for(lambda: "clave-vm" in docker("info", "--format", "{{json .Runtimes}}").stdout, "dockerd to reload")
    yield docker


def test_docker_runtime_args_select_vm(docker_vm: Docker, vm_guest: Guest) -> None:
    docker = docker_vm
    result = docker("run", "--rm", "--runtime", "clave-vm", "--network", "none", IMAGE, "sh", "-c",
                    "uname -r; cat /etc/hostname; echo to-stderr >&2; exit 3", check=False, timeout=180)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == vm_guest.kernel_release and len(lines) == 2, result.stdout  # /etc/hostname: Docker's file
    assert result.stderr == "to-stderr\n"

    name = f"dkvm-{uuid.uuid4().hex[:6]}"
    docker("run", "--detach", "--name", name, "--runtime", "clave-vm", "--network", "none", IMAGE, *SERVICE,
           timeout=180)
    try:
        done = docker("exec", name, "sh", "-c", "uname -r; echo e >&2; exit 4", check=False)
        assert (done.returncode, done.stdout, done.stderr) == (4, f"{vm_guest.kernel_release}\n", "e\n")
        status, text = docker.pty("exec", "-it", name, "sh", "-c", "tty; exit 6")
        assert status == 6 and "/dev/pts/" in text, text
        docker("stop", "--time", "10", name)
        assert docker.inspect(name, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    finally:
        docker("rm", "--force", name)
