"""Docker 20.10 (Debian's docker.io) drives clave as a configured runtime (`"runtimes": {"clave": {"path": ...}}`
in daemon.json): run (output, exit status, --memory, -it), exec (with and without -it), pause/unpause, update,
top, stats, logs, restart, stop, kill and rm -f, each done with `--runtime runc` too and compared.

A private dockerd per module: its own --data-root, --exec-root, socket, pid file and cgroup parent, vfs
storage, no iptables or bridge, on the private containerd of conftest (its namespace), with a busybox image
built from Debian's busybox-static and loaded with `docker load`. The teardown stops dockerd by its pid and
checks that no process, mount, cgroup, netns or state of it remains."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import cgroup_dirs, clave_binary, process_argvs, stop_pid, wait_for

if TYPE_CHECKING:
    from conftest import Containerd

DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker may be another program on these machines
DOCKERD = "/usr/sbin/dockerd"
IMAGE = "busybox-clave:latest"
RUNTIMES = ("runc", "clave")
# Stops at once on SIGTERM; as pid 1 a bare `sleep` ignores it until Docker's SIGKILL.
SERVICE = ["sh", "-c", "trap 'exit 0' TERM; echo started; while true; do sleep 0.2; done"]
MIB = 1 << 20


@dataclass
class Docker:
    base: Path
    socket: Path
    exec_root: Path
    cgroup_parent: str
    pid: int

    def __call__(self, *args: str, check: bool = True, timeout: float = 60,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [DOCKER, "-H", f"unix://{self.socket}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def pty(self, *args: str, send: bytes = b"", timeout: float = 60) -> tuple[int, str]:
        """Run docker with a pty as its stdin/stdout/stderr (for -it); returns its status and what it printed."""
        master, slave = os.openpty()
        proc = subprocess.Popen([DOCKER, "-H", f"unix://{self.socket}", *args], stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True)
        os.close(slave)
        out = b""
        deadline = time.monotonic() + timeout
        try:
            if send:
                # typed only once the container's shell prints its prompt, as a person would
                while b"# " not in out and proc.poll() is None:
                    assert time.monotonic() < deadline, f"no shell prompt in {out!r}"
                    out += _read_ready(master)
                os.write(master, send)
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: every holder of the pty's other side is gone
                        break
                    if not chunk:
                        break
                    out += chunk
                elif proc.poll() is not None:
                    break
            status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
        return status, out.decode(errors="replace").replace("\r\n", "\n")

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "--format", template, name).stdout.strip()

    def container_ids(self) -> list[str]:
        return self("ps", "--all", "--quiet", "--no-trunc").stdout.split()


def _read_ready(fd: int) -> bytes:
    ready, _, _ = select.select([fd], [], [], 0.1)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.fixture(scope="module")
def docker(containerd: Containerd, clave: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    for tool, package in ((DOCKER, "docker.io"), (DOCKERD, "docker.io"), ("runc", "runc")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package})")
    from clave.tools.bundles import BUSYBOX, make_busybox_rootfs, write_image_archive

    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not found: install Debian's busybox-static")
    base = Path(tmp_path_factory.mktemp("dockerd"))
    config = base / "daemon.json"
    config.write_text(json.dumps({"runtimes": {
        "clave": {"path": str(clave)},
        "clave-debug": {"path": str(clave), "runtimeArgs": ["--debug"]},  # global flags, before the verb
    }}))
    run_docker_existed = os.path.exists("/run/docker")  # dockerd makes /run/docker/plugins whatever its flags
    # The containerd fixture removes what is left in its namespace and in the cgroup of that name.
    cgroup_parent = "/" + containerd.namespace
    socket, exec_root, pid_file = base / "docker.sock", base / "exec", base / "docker.pid"
    log = open(base / "dockerd.log", "wb")
    daemon = subprocess.Popen(
        [DOCKERD, "--data-root", str(base / "data"), "--exec-root", str(exec_root), "-H", f"unix://{socket}",
         "--pidfile", str(pid_file), "--iptables=false", "--ip6tables=false", "--bridge=none",
         "--storage-driver", "vfs", "--config-file", str(config), "--containerd", containerd.address,
         "--containerd-namespace", containerd.namespace,
         "--containerd-plugins-namespace", containerd.namespace + "-plugins", "--cgroup-parent", cgroup_parent],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    instance = Docker(base, socket, exec_root, cgroup_parent, daemon.pid)
    try:
        def answering() -> bool:
            assert daemon.poll() is None, (base / "dockerd.log").read_text()[-2000:]
            return socket.exists() and instance("version", check=False, timeout=10).returncode == 0

        wait_for(answering, "dockerd to answer", timeout=30, interval=0.2)
        assert int(pid_file.read_text()) == daemon.pid
        rootfs = make_busybox_rootfs(str(base / "rootfs"))
        archive = write_image_archive(rootfs, str(base / "busybox.tar"), IMAGE)
        assert f"Loaded image: {IMAGE}" in instance("load", "--input", archive).stdout
        yield instance
    finally:
        if daemon.poll() is None:
            for cid in instance.container_ids() if socket.exists() else []:
                instance("rm", "--force", cid, check=False)
            instance("rmi", "--force", IMAGE, check=False)
        stop_pid(daemon.pid, grace=15)
        daemon.wait(timeout=10)
        problems = _leftovers(instance, containerd)
        if not run_docker_existed:
            shutil.rmtree("/run/docker", ignore_errors=True)
        for mount in reversed(_mounts_under(base)):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(base, ignore_errors=True)
        assert not problems, f"dockerd left behind: {problems}"


def _leftovers(docker: Docker, containerd: Containerd) -> list[str]:
    found = []
    if Path(f"/proc/{docker.pid}").exists():
        found.append(f"dockerd {docker.pid} still runs")
    for pid, argv in process_argvs():
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        if f":{docker.cgroup_parent}/" in cgroups:
            found.append(f"process {pid}: {b' '.join(argv).decode(errors='replace')[:80]}")
    found += [f"mount {m}" for m in _mounts_under(docker.base)]
    for directory in cgroup_dirs(docker.cgroup_parent.lstrip("/")):
        found += [f"cgroup {p}" for p in directory.iterdir() if p.is_dir()]
    netns = docker.exec_root / "netns"
    if netns.is_dir():
        found += [f"netns {p}" for p in netns.iterdir()]
    for root in docker.exec_root.glob("runtime-*"):  # the runtime's --root, one dir per container
        found += [f"runtime state {p}" for p in root.glob("*/*")]
    return found


def name() -> str:
    return f"dk-{uuid.uuid4().hex[:8]}"


def both(scenario: Callable[[str], Any]) -> dict[str, Any]:
    """The scenario's observations with each runtime; the test asserts clave's equal runc's."""
    return {runtime: scenario(runtime) for runtime in RUNTIMES}


def memory_limit_command() -> list[str]:
    return ["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"]


def detached(docker: Docker, runtime: str, *options: str, command: list[str] = SERVICE) -> str:
    container = name()
    docker("run", "--detach", "--name", container, "--runtime", runtime, *options, IMAGE, *command)
    wait_for(lambda: "started" in docker("logs", container).stdout or command is not SERVICE,
             "the container to start")
    return container


def test_run_output_and_exit_status(docker: Docker) -> None:
    def scenario(runtime: str) -> tuple[int, str, str]:
        result = docker("run", "--rm", "--runtime", runtime, IMAGE, "sh", "-c",
                        "echo hello from $(cat /proc/1/comm); echo to-stderr >&2; exit 3", check=False)
        return result.returncode, result.stdout, result.stderr

    seen = both(scenario)
    assert seen["runc"] == (3, "hello from sh\n", "to-stderr\n")
    assert seen["clave"] == seen["runc"]


def test_run_memory_limit(docker: Docker) -> None:
    seen = both(lambda runtime: docker("run", "--rm", "--runtime", runtime, "--memory", "64m", IMAGE,
                                       *memory_limit_command()).stdout)
    assert seen["runc"] == f"{64 * MIB}\n"
    assert seen["clave"] == seen["runc"]


def test_run_interactive_tty(docker: Docker) -> None:
    def scenario(runtime: str) -> tuple[int, str]:
        return docker.pty("run", "--rm", "-it", "--runtime", runtime, IMAGE, "sh", "-c",
                          "tty; [ -t 0 ] && echo stdin-is-a-tty; stty size; exit 7")

    seen = both(scenario)
    status, out = seen["runc"]
    assert status == 7 and "/dev/pts/0" in out and "stdin-is-a-tty" in out, out
    assert seen["clave"] == seen["runc"]


def test_exec_with_and_without_tty(docker: Docker) -> None:
    def scenario(runtime: str) -> tuple[Any, ...]:
        container = detached(docker, runtime)
        try:
            plain = docker("exec", container, "sh", "-c", "echo in-exec $(cat /proc/1/comm); echo e >&2; exit 4",
                           check=False)
            env = docker("exec", "--env", "GREETING=hi", "--workdir", "/tmp", container, "sh", "-c",
                         "echo $GREETING $(pwd)").stdout
            tty = docker.pty("exec", "-it", container, "sh", "-c", "tty; exit 6")
            typed = docker.pty("exec", "-it", container, "sh", send=b"echo typed-$((6*7)); exit 5\n")
            return (plain.returncode, plain.stdout, plain.stderr), env, tty, (typed[0], "typed-42" in typed[1])
        finally:
            docker("rm", "--force", container)

    seen = both(scenario)
    assert seen["runc"][0] == (4, "in-exec sh\n", "e\n")
    assert seen["runc"][1] == "hi /tmp\n"
    assert seen["runc"][2][0] == 6 and "/dev/pts/" in seen["runc"][2][1]
    assert seen["runc"][3] == (5, True)
    assert seen["clave"] == seen["runc"]


def test_pause_unpause_and_update(docker: Docker) -> None:
    def scenario(runtime: str) -> list[Any]:
        container = detached(docker, runtime)
        try:
            docker("pause", container)
            seen: list[Any] = [docker.inspect(container, "{{.State.Status}} {{.State.Paused}}")]
            seen.append(docker("exec", container, "true", check=False).returncode)  # refused while paused
            docker("unpause", container)
            seen.append(docker.inspect(container, "{{.State.Status}} {{.State.Paused}}"))
            seen.append(docker("exec", container, "echo", "thawed").stdout)
            docker("update", "--memory", "48m", "--memory-swap", "96m", "--cpu-shares", "512", "--pids-limit",
                   "50", container)
            seen.append(docker("exec", container, *memory_limit_command()).stdout)
            seen.append(docker("exec", container, "cat", "/sys/fs/cgroup/pids/pids.max").stdout)
            seen.append(docker.inspect(container, "{{.HostConfig.Memory}} {{.HostConfig.CpuShares}}"))
            return seen
        finally:
            docker("rm", "--force", container)

    seen = both(scenario)
    assert seen["runc"] == ["paused true", 1, "running false", "thawed\n", f"{48 * MIB}\n", "50\n",
                            f"{48 * MIB} 512"]
    assert seen["clave"] == seen["runc"]


def test_top_stats_and_logs(docker: Docker) -> None:
    def scenario(runtime: str) -> list[Any]:
        container = detached(docker, runtime, "--memory", "64m", command=[
            "sh", "-c", "echo line-1; echo line-2 >&2; sleep 300 & wait"])
        try:
            wait_for(lambda: "line-2" in docker("logs", container).stderr, "the log lines")
            top = docker("top", container).stdout.splitlines()
            columns = top[0].split()
            # CMD is the last column (ps may cut it short): its first two words name each process
            commands = sorted(" ".join(row.split(None, len(columns) - 1)[-1].split()[:2]) for row in top[1:])
            stats = docker("stats", "--no-stream", "--format", "{{json .}}", container).stdout
            doc = json.loads(stats)
            logs = docker("logs", container)
            return [columns, commands, doc["Name"], doc["MemUsage"].split(" / ")[1], doc["PIDs"],
                    logs.stdout, logs.stderr]
        finally:
            docker("rm", "--force", container)

    seen = both(scenario)
    runc = seen["runc"]
    assert runc[0][:3] == ["UID", "PID", "PPID"] and runc[1] == ["sh -c", "sleep 300"]
    assert runc[3:] == ["64MiB", "2", "line-1\n", "line-2\n"]
    assert seen["clave"][:2] == runc[:2] and seen["clave"][3:] == runc[3:]
    assert seen["clave"][2] != runc[2]  # the names differ; the row is there


def test_restart_stop_and_kill(docker: Docker) -> None:
    def scenario(runtime: str) -> list[Any]:
        container = detached(docker, runtime)
        try:
            first_pid = docker.inspect(container, "{{.State.Pid}}")
            docker("restart", "--time", "5", container)
            wait_for(lambda: docker("logs", container).stdout.count("started") == 2, "the restarted container")
            seen: list[Any] = [docker.inspect(container, "{{.State.Status}}"),
                               docker.inspect(container, "{{.State.Pid}}") != first_pid]
            started = time.monotonic()
            docker("stop", "--time", "10", container)
            seen.append(time.monotonic() - started < 5)  # stopped by SIGTERM, not by the SIGKILL 10 s later
            seen.append(docker.inspect(container, "{{.State.Status}} {{.State.ExitCode}}"))
            docker("start", container)
            docker("kill", container)
            wait_for(lambda: docker.inspect(container, "{{.State.Status}}") == "exited", "the killed container")
            seen.append(docker.inspect(container, "{{.State.ExitCode}}"))
            docker("start", container)
            docker("kill", "--signal", "TERM", container)
            wait_for(lambda: docker.inspect(container, "{{.State.Status}}") == "exited", "the TERMed container")
            seen.append(docker.inspect(container, "{{.State.ExitCode}}"))
            return seen
        finally:
            docker("rm", "--force", container)

    seen = both(scenario)
    assert seen["runc"] == ["running", True, True, "exited 0", "137", "0"]
    assert seen["clave"] == seen["runc"]


def test_stop_escalates_to_sigkill(docker: Docker) -> None:
    def scenario(runtime: str) -> str:
        container = detached(docker, runtime, command=["sleep", "300"])  # pid 1 ignores SIGTERM
        try:
            docker("stop", "--time", "1", container)
            return docker.inspect(container, "{{.State.Status}} {{.State.ExitCode}}")
        finally:
            docker("rm", "--force", container)

    seen = both(scenario)
    assert seen["runc"] == "exited 137"
    assert seen["clave"] == seen["runc"]


def test_rm_force_leaves_nothing(docker: Docker, containerd: Containerd) -> None:
    def scenario(runtime: str) -> list[Any]:
        container = detached(docker, runtime)
        full_id = docker.inspect(container, "{{.Id}}")
        pid = int(docker.inspect(container, "{{.State.Pid}}"))
        docker("rm", "--force", container)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the container's init to go")
        cgroups = [str(p) for p in cgroup_dirs(f"{docker.cgroup_parent.lstrip('/')}/{full_id}")]
        state = [str(p) for p in docker.exec_root.glob(f"runtime-*/*/{full_id}")]
        return [full_id in docker.container_ids(), cgroups, state, containerd.shims(full_id)]

    seen = both(scenario)
    assert seen["runc"] == [False, [], [], []]
    assert seen["clave"] == seen["runc"]


def test_runtime_args_are_global_flags(docker: Docker, containerd: Containerd) -> None:
    """`runtimeArgs` go before the verb: Docker 20.10 runs a wrapper, DATA_ROOT/runtimes/NAME, that puts them there."""
    container = detached(docker, "clave-debug")
    try:
        full_id = docker.inspect(container, "{{.Id}}")
        assert docker("exec", container, "echo", "ok").stdout == "ok\n"
        state = list(docker.exec_root.glob(f"runtime-runc/*/{full_id}"))
        assert state, "clave's state is not under the exec root's runtime-runc/NAMESPACE"
        wrapper = (docker.base / "data" / "runtimes" / "clave-debug").read_text()
        assert f"{clave_binary()} --debug" in wrapper, wrapper
        assert (containerd.bundle_dir(full_id) / "log.json").exists()  # the shim's --log, in the bundle
    finally:
        docker("rm", "--force", container)
