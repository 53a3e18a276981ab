"""The vm handler through the `clave` CLI, as runc's shim, podman and Docker drive it: run (exit codes, 128+N,
stdio byte for byte, stdin EOF), create/start/state, exec with and without a tty (resize reaches the guest),
ps, pause/resume, update, events --stats, kill, delete; root.readonly, a host file bind, a host directory bind
(virtio-fs), a bind of nothing refused; one writable layer per container over one cached base image; faults
(QEMU killed, a guest that cannot boot, the caller killed at each step, bad input); and nothing left after
delete (qemu, virtiofsd, the VM's directory in /run/clave-vm, the layer in /var/lib/clave/vm/layers, the state
dir, keeper and stand-ins).

Each test boots as few VMs as it can (a boot costs ~4-6 s of TCG here): checks are grouped per container.
Real QEMU, the real guest; root is needed."""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import alive, reap_children

from clave.config.defaults import default_spec
from clave.tools.bundles import make_busybox_rootfs
from clave.vm.guest import Guest
from tests.vm.conftest import _skip_reason

CLAVE = str(Path(sys.executable).with_name("clave"))
VM_RUN = Path("/run/clave-vm")
PR_SET_CHILD_SUBREAPER = 36
MIB = 1 << 20


# -- fixtures and helpers (test_isolation and test_interop use them too) -------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _subreaper() -> Iterator[None]:
    """Keepers and stand-ins outlive the `clave` that forked them: as a shim is, we are their subreaper."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    reap_children()


@pytest.fixture(scope="session")
def vm_guest() -> Guest:
    """The guest the handler boots, built (or found up to date: ~9 s of hashing its inputs) once per session."""
    from clave.vm.guest import build_guest

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return build_guest()


@pytest.fixture(scope="module")
def vm_rootfs(vm_guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs (its content is the cached base image every test of the module shares)."""
    base = tmp_path_factory.mktemp("vmrootfs")
    base.chmod(0o755)
    return Path(make_busybox_rootfs(str(base / "rootfs")))


def vm_config(args: list[str], rootfs: Path | str, readonly: bool = False) -> dict[str, Any]:
    config = default_spec()
    config["process"].update(args=args, terminal=False)
    config["root"] = {"path": str(rootfs), "readonly": readonly}
    return config


def add_caps(config: dict[str, Any], *caps: str) -> None:
    for kind in ("bounding", "effective", "permitted"):
        config["process"]["capabilities"][kind] += list(caps)


class Cli:
    """`clave --root ROOT --log LOG` from a bundle dir; create and run select the vm handler (--handler vm)."""

    def __init__(self, base: Path, rootfs: Path) -> None:
        self.base = base
        self.root = base / "state"
        self.log = base / "log.json"
        self.bundle = base / "bundle"
        self.bundle.mkdir(parents=True)
        self.rootfs = rootfs
        self.prefix = "vh" + secrets.token_hex(3)
        self.traces: list[Trace] = []

    def id(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def write(self, config: dict[str, Any]) -> None:
        (self.bundle / "config.json").write_text(json.dumps(config))

    def command(self, *args: str, handler: bool = False, log: Path | None = None) -> list[str]:
        return [CLAVE, "--root", str(self.root), "--log", str(log or self.log), "--log-format", "json",
                *(["--handler", "vm"] if handler else []), *args]

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 120,
                 env: dict[str, str] | None = None, handler: bool = False) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(self.command(*args, handler=handler), input=input, capture_output=True,
                                timeout=timeout, cwd=self.bundle, env=None if env is None else {**os.environ, **env},
                                stdin=subprocess.DEVNULL if input is None else None)
        if check and result.returncode != 0:
            raise AssertionError(f"clave {' '.join(args)} exited {result.returncode}: {result.stderr!r}")
        return result

    def popen(self, *args: str, stdin: Any = subprocess.DEVNULL, name: str = "p", handler: bool = False,
              env: dict[str, str] | None = None, log: Path | None = None) -> tuple[subprocess.Popen[bytes], Path, Path]:
        """A `clave` in the background, its stdout and stderr to files (a keeper keeps them open)."""
        out, err = self.base / f"{name}.out", self.base / f"{name}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(self.command(*args, handler=handler, log=log), stdin=stdin, stdout=o, stderr=e,
                                    cwd=self.bundle, env=None if env is None else {**os.environ, **env})
        return proc, out, err

    def create(self, cid: str, *extra: str) -> int:
        pid_file = self.base / f"{cid}.pid"
        proc, _, err = self.popen("create", "--bundle", str(self.bundle), "--pid-file", str(pid_file), *extra, cid,
                                  name=cid, handler=True)
        assert proc.wait(timeout=120) == 0, err.read_text()
        self.traces.append(trace(self, cid))
        return int(pid_file.read_text())

    def state(self, cid: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self("state", cid).stdout)
        return doc

    def fail(self, *args: str, env: dict[str, str] | None = None, handler: bool = True) -> str:
        """A command that must fail with exactly one line on stderr; returns it."""
        proc, out, err = self.popen(*args, name="fail", handler=handler, env=env)
        assert proc.wait(timeout=180) != 0, f"{' '.join(args)} unexpectedly succeeded"
        lines = err.read_text().strip().splitlines()
        assert len(lines) == 1, f"expected one error line, got {lines!r}"
        return lines[0]


@dataclass
class Trace:
    """Where a vm container lives on the host, read from its state while it exists."""

    state_dir: Path
    vm_dir: str = ""
    layer: str = ""
    binds: str = ""
    keeper: int = 0
    qemu: int = 0
    standins: list[int] = field(default_factory=list)

    def leftovers(self) -> list[str]:
        found = [f"state dir {self.state_dir}"] if self.state_dir.exists() else []
        found += [f"{what} {path}" for what, path in (("vm dir", self.vm_dir), ("layer", self.layer),
                                                       ("binds image", self.binds)) if path and os.path.exists(path)]
        found += [f"qemu {self.qemu}"] if self.qemu and alive(self.qemu) else []
        found += [f"keeper {self.keeper}"] if self.keeper and alive(self.keeper) else []
        found += [f"stand-in {pid}" for pid in self.standins if alive(pid)]
        if self.vm_dir:  # qemu, virtiofsd, swtpm: whatever runs with a path in the VM's directory
            found += [f"process {pid}: {cmd[:100]}" for pid, cmd in commands() if self.vm_dir in cmd]
        return found


def trace(cli: Cli | Path, cid: str, timeout: float = 60, need_qemu: bool = True) -> Trace:
    """Read a container's state dir under a Cli's root (or a runtime root) and its VM's vm.json as soon as they
    exist."""
    t = Trace((cli.root if isinstance(cli, Cli) else cli) / cid)
    deadline = time.monotonic() + timeout
    while True:
        try:
            doc = json.loads((t.state_dir / "state.json").read_text())
            hs = doc.get("handler_state", {})
            t.vm_dir, t.layer, t.binds, t.keeper = hs.get("vm_dir", ""), hs.get("layer", ""), hs.get("binds", ""), \
                doc.get("pid", 0)
            if t.vm_dir and (not need_qemu or t.qemu):
                return t
            if t.vm_dir:
                t.qemu = int(json.loads(Path(t.vm_dir, "vm.json").read_text()).get("pid") or 0)
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, f"no VM state for {cid} within {timeout} s"
        time.sleep(0.05)


def assert_gone(t: Trace, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while t.leftovers() and time.monotonic() < deadline:
        reap_children()
        time.sleep(0.1)
    assert t.leftovers() == []


def reap(pid: int, timeout: float = 30) -> int:
    """The exit code of a keeper or stand-in re-parented to us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit")


def commands() -> list[tuple[int, str]]:
    """(pid, command line) of every live process."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                              .decode(errors="replace")))
            except OSError:
                pass
    return found


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def vm_entries() -> set[str]:
    layers = Path("/var/lib/clave/vm/layers")
    return {str(p) for d in (VM_RUN, layers) if d.is_dir() for p in d.iterdir()}


@pytest.fixture
def cli(tmp_path: Path, vm_rootfs: Path) -> Iterator[Cli]:
    c = Cli(tmp_path, vm_rootfs)
    yield c
    for cid in os.listdir(c.root) if c.root.exists() else []:
        c("delete", "--force", cid, check=False)
    for t in c.traces:
        assert_gone(t)
    reap_children()


def receive_master(listener: socket.socket, timeout: float = 120) -> tuple[int, str]:
    """runc's console socket: one message whose SCM_RIGHTS fd is the pty master."""
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    with conn:
        fds = array.array("i")
        data, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: fds.itemsize])
    assert len(fds) == 1, "no fd in the console socket message"
    return fds[0], data.decode()


def read_master(master: int, until: bytes, timeout: float = 10) -> bytes:
    """Read the pty master until ``until`` shows (or EOF / the timeout)."""
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while until not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:
                break
            raise
        if not chunk:
            break
        out += chunk
    return out


# -- refusals: no VM ---------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    before = vm_entries()
    config = vm_config(["true"], cli.rootfs)
    config["mounts"].append({"destination": "/data", "type": "bind", "source": str(tmp_path / "nosuch"),
                             "options": ["rbind", "rw"]})
    cli.write(config)
    line = cli.fail("create", "--bundle", str(cli.bundle), cli.id("dir"))
    assert "is not a file or directory" in line and str(tmp_path / "nosuch") in line, line
    line = cli.fail("run", "--bundle", str(cli.bundle), cli.id("dirrun"))
    assert "is not a file or directory" in line, line

    cli.write(vm_config(["true"], cli.rootfs))
    line = cli.fail("--handler", "nosuch", "create", "--bundle", str(cli.bundle), cli.id("unknown"), handler=False)
    assert "unknown container handler 'nosuch'" in line, line
    config = vm_config(["true"], cli.rootfs)
    config["annotations"] = {"io.clave.handler": "nosuch"}
    cli.write(config)
    assert "unknown container handler" in cli.fail("create", "--bundle", str(cli.bundle), cli.id("annot"))

    (cli.bundle / "config.json").write_text("{")
    cli.fail("create", "--bundle", str(cli.bundle), cli.id("broken"))
    config = vm_config(["true"], cli.rootfs)
    config["annotations"] = {"io.clave.vm.memory": "lots"}
    cli.write(config)
    assert "must be integers" in cli.fail("create", "--bundle", str(cli.bundle), cli.id("size"))
    config["annotations"] = {"io.clave.vm.memory": str(1 << 30)}
    cli.write(config)
    cli.fail("create", "--bundle", str(cli.bundle), cli.id("huge"))

    assert not cli.root.exists() or os.listdir(cli.root) == []
    assert vm_entries() - before == set(), "a refused create left a VM dir or a layer"


# -- clave run -----------------------------------------------------------------------------------------------------


def test_run_stdio_byte_exact_readonly_root_and_file_bind(cli: Cli, tmp_path: Path) -> None:
    """Megabytes of random bytes in through stdin (its EOF ends `cat`), out through stdout and stderr, byte for
    byte; the exit code; a read-only root; a host file bound read-only (an /etc/hosts of our own)."""
    data = os.urandom(4 * MIB + 12345)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"10.1.2.3 clave-host-file-{cli.prefix}\n")
    config = vm_config(["sh", "-c", "cat > /dev/shm/in; cat /dev/shm/in; cat /dev/shm/in >&2; "
                                    "echo; echo --; cat /etc/hosts; { touch /new-file; } 2>/dev/null || echo root-ro; "
                                    "{ echo x >> /etc/hosts; } 2>/dev/null || echo bind-ro; exit 3"], cli.rootfs,
                       readonly=True)
    config["mounts"].append({"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
                             "options": ["rbind", "ro"]})
    cli.write(config)
    (tmp_path / "in.bin").write_bytes(data)
    cid = cli.id("run")
    with open(tmp_path / "in.bin", "rb") as stdin:
        proc, out, err = cli.popen("run", "--bundle", str(cli.bundle), cid, stdin=stdin, name="run", handler=True)
        t = trace(cli, cid)
        status = proc.wait(timeout=180)
    stdout, stderr = out.read_bytes(), err.read_bytes()
    assert status == 3, stderr[-500:]
    assert stdout[: len(data)] == data, "stdout differs from what went in"
    assert stderr == data, f"stderr differs ({len(stderr)} bytes for {len(data)})"
    tail = stdout[len(data):].decode()
    assert tail == f"\n--\n10.1.2.3 clave-host-file-{cli.prefix}\nroot-ro\nbind-ro\n", tail
    assert t.layer and not t.binds.endswith(".qcow2")
    assert hosts.read_text() == f"10.1.2.3 clave-host-file-{cli.prefix}\n"
    assert_gone(t)  # `clave run` deletes: no qemu, VM dir, layer, binds image, state dir


def test_each_container_writes_its_own_layer_over_one_base_image(cli: Cli, tmp_path: Path) -> None:
    """Two containers of one bundle: neither sees the other's writes; the base image of the content is made once
    (by the first create) and shared. The second is killed through `clave kill`: `clave run` exits 128+9."""
    from clave.vm.rootfs import ROOTFS_CACHE, tree_digest

    rootfs = tmp_path / "rootfs"
    shutil.copytree(cli.rootfs, rootfs, symlinks=True)
    (rootfs / "etc" / "unique").write_text(secrets.token_hex(16))  # content no other test has: a new image
    digest, _ = tree_digest(str(rootfs))
    image = Path(ROOTFS_CACHE) / f"{digest}.img"
    assert not image.exists()
    script = "test -e /w && echo seen $(cat /w) || echo clean; echo {0} > /w; cat /w; {1}"
    try:
        cli.write(vm_config(["sh", "-c", script.format("one", "exit 0")], rootfs))
        first = cli.id("one")
        proc, out, err = cli.popen("run", "--bundle", str(cli.bundle), first, name=first, handler=True,
                                   log=tmp_path / "one.log")
        t1 = trace(cli, first)
        assert proc.wait(timeout=180) == 0, err.read_text()
        assert out.read_text() == "clean\none\n"
        assert_gone(t1)
        made = image.stat()
        assert "making the rootfs image" in (tmp_path / "one.log").read_text()

        cli.write(vm_config(["sh", "-c", script.format("two", "exec sleep 1000")], rootfs))
        second = cli.id("two")
        proc, out, err = cli.popen("run", "--bundle", str(cli.bundle), second, name=second, handler=True,
                                   log=tmp_path / "two.log")
        t2 = trace(cli, second)
        assert t2.layer != t1.layer and os.path.exists(t2.layer)
        wait_for(lambda: "two" in out.read_text() or proc.poll() is not None, "the second container's output",
                 timeout=120)
        cli("kill", second, "KILL")
        assert proc.wait(timeout=60) == 128 + signal.SIGKILL, err.read_text()
        assert out.read_text() == "clean\ntwo\n"
        assert_gone(t2)
        again = image.stat()
        assert (again.st_ino, again.st_mtime_ns) == (made.st_ino, made.st_mtime_ns), "the base image was made again"
        assert "making the rootfs image" not in (tmp_path / "two.log").read_text()
        assert sorted(p.name for p in Path(ROOTFS_CACHE).glob(f"{digest}*")) == [image.name, f"{image.name}.lock"]
    finally:
        for path in (image, Path(f"{image}.lock"), Path(f"{image}.tmp")):
            path.unlink(missing_ok=True)


# -- create, start, state, exec, ps, pause, resume, update, events, QEMU killed, delete ----------------------------


def test_lifecycle_exec_tty_stats_and_qemu_killed(cli: Cli, tmp_path: Path) -> None:
    config = vm_config(["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"], cli.rootfs)
    add_caps(config, "CAP_NET_ADMIN", "CAP_NET_RAW")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "from-host").write_text("host wrote this\n")
    config["mounts"].append({"destination": "/data", "type": "bind", "source": str(volume),
                             "options": ["rbind", "rw"]})
    cli.write(config)
    cid = cli.id("life")
    keeper = cli.create(cid)
    t = cli.traces[-1]
    doc = cli.state(cid)
    assert (doc["status"], doc["pid"]) == ("created", keeper)
    assert doc["vm"]["accel"] in ("kvm", "tcg") and doc["vm"]["boot_seconds"] > 0 and doc["vm"]["vmm_rss_bytes"] > 0
    assert t.qemu and alive(t.qemu) and os.path.exists(t.layer)
    cli("start", cid)
    assert cli.state(cid)["status"] == "running"
    assert "start" in cli("start", cid, check=False).stderr.decode()  # started already: refused

    # exec without a tty: stdout and stderr apart, exit codes, 128+N for a signal
    done = cli("exec", cid, "sh", "-c", "echo out; echo err >&2; exit 5", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (5, b"out\n", b"err\n")
    assert cli("exec", cid, "sh", "-c", "kill -9 $$", check=False).returncode == 128 + signal.SIGKILL
    assert cli("exec", cid, "sh", "-c", "kill -TERM $$", check=False).returncode == 128 + signal.SIGTERM
    # stdin to EOF and megabytes back, byte for byte (written to the container's layer)
    data = os.urandom(2 * MIB + 777)
    done = cli("exec", cid, "sh", "-c", "cat > /in; cat /in; cat /in >&2; rm /in", input=data)
    assert done.stdout == data and done.stderr == data, (len(done.stdout), len(done.stderr))

    # a bound host directory is shared live, both ways
    assert cli("exec", cid, "sh", "-c", "cat /data/from-host; echo guest wrote this > /data/from-guest").stdout \
        == b"host wrote this\n"
    assert (volume / "from-guest").read_text() == "guest wrote this\n"

    # exec with a tty: the pty's size set on the host reaches the guest's pty
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    proc, _, err = cli.popen("exec", "--tty", "--console-socket", path, cid, "sh", "-c",
                             "tty; echo ready; while read line; do stty size; done; exit 6", name="tty")
    master, _name = receive_master(listener)
    try:
        seen = read_master(master, b"ready")
        assert b"/dev/pts/" in seen and b"ready" in seen, seen
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        deadline = time.monotonic() + 20
        while b"33 101" not in seen:
            assert time.monotonic() < deadline, f"the resize never reached the guest: {seen!r}"
            os.write(master, b"x\r")
            seen += read_master(master, b"33 101", timeout=1)
        os.write(master, b"\x04")  # EOF on the guest's tty ends the loop
        assert proc.wait(timeout=30) == 6, err.read_text()
    finally:
        os.close(master)
        listener.close()

    # ps: the keeper (the init's stand-in) and a detached exec's stand-in
    pid_file = tmp_path / "sleeper.pid"
    proc, _, err = cli.popen("exec", "--detach", "--pid-file", str(pid_file), cid, "sleep", "1000", name="sleeper")
    assert proc.wait(timeout=60) == 0, err.read_text()  # files, not pipes: the stand-in keeps them open
    sleeper = int(pid_file.read_text())
    t.standins.append(sleeper)
    assert json.loads(cli("ps", "--format", "json", cid).stdout) == sorted([keeper, sleeper])
    table = cli("ps", cid).stdout.decode()
    assert str(keeper) in table and str(sleeper) in table

    # pause and resume
    cli("pause", cid)
    assert cli.state(cid)["status"] == "paused"
    refused = cli("exec", cid, "true", check=False)
    assert refused.returncode != 0 and "paused" in refused.stderr.decode()
    cli("resume", cid)
    assert cli.state(cid)["status"] == "running"

    # update reaches the guest's cgroup
    cli("update", "--pids-limit", "50", "--memory", str(96 * MIB), cid)
    limits = cli("exec", cid, "cat", "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/memory.max").stdout.split()
    assert limits == [b"50", str(96 * MIB).encode()]

    # events --stats from inside the guest: cpu, memory, pids, network, block IO
    traffic = cli("exec", cid, "sh", "-c", "ip link set lo up && ping -c 2 -W 2 127.0.0.1 >/dev/null && "
                                          "dd if=/dev/zero of=/blk bs=64k count=32 conv=fsync 2>/dev/null && "
                                          "cat /bin/busybox > /dev/null && echo ok", check=False)
    assert traffic.stdout == b"ok\n", traffic.stderr
    event = json.loads(cli("events", "--stats", cid).stdout)
    assert (event["type"], event["id"]) == ("stats", cid)
    stats = event["data"]
    assert stats["cpu"]["usage"]["total"] > 0 and stats["cpu"]["usage"]["user"] > 0
    assert stats["memory"]["usage"]["usage"] > 0 and stats["memory"]["usage"]["limit"] == 96 * MIB
    assert stats["pids"]["current"] >= 2 and stats["pids"]["limit"] == 50  # sh and the detached sleep
    io = {(e["op"], e["major"], e["minor"]): e["value"] for e in stats["blkio"]["ioServiceBytesRecursive"]}
    assert any(v > 0 for (op, *_), v in io.items() if op == "Read"), io
    assert any(v >= 2 * MIB for (op, *_), v in io.items() if op == "Write"), io
    lo = {i["name"]: i for i in stats["network_interfaces"]}["lo"]
    assert lo["rx_packets"] >= 4 and lo["tx_bytes"] > 0, lo

    # QEMU killed: the container stops with a status; delete leaves nothing
    os.kill(t.qemu, signal.SIGKILL)
    assert reap(keeper) == 128 + signal.SIGKILL
    doc = cli.state(cid)
    assert (doc["status"], doc["pid"]) == ("stopped", 0)
    refused = cli("exec", cid, "true", check=False)
    assert refused.returncode != 0 and len(refused.stderr.decode().strip().splitlines()) == 1
    cli("delete", cid)
    assert_gone(t)


# -- faults ---------------------------------------------------------------------------------------------------------


def test_boot_failure_is_one_line_with_the_console_tail(cli: Cli) -> None:
    before = vm_entries()
    cli.write(vm_config(["true"], cli.rootfs))
    started = time.monotonic()
    line = cli.fail("run", "--bundle", str(cli.bundle), cli.id("boot"),
                    env={"CLAVE_TEST_VM_KERNEL_ARGS": "rdinit=/nonexistent"})
    assert "console:" in line and "Kernel panic" in line, line
    assert time.monotonic() - started < 90
    assert not cli.root.exists() or os.listdir(cli.root) == []
    reap_children()
    assert vm_entries() - before == set()


@pytest.mark.parametrize("step", ["after-state-dir", "after-rootfs-image", "booting"])
def test_delete_force_after_the_caller_is_killed(cli: Cli, tmp_path: Path, step: str) -> None:
    """kill -9 of `clave create` at each of its steps (the handler's pause points; and while the keeper boots
    the VM), then `clave delete --force`: no qemu, VM dir, socket, layer, binds image or state dir remains."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    config = vm_config(["sleep", "1000"], cli.rootfs)
    config["mounts"].append({"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
                             "options": ["rbind", "ro"]})
    cli.write(config)
    cid = cli.id("crash")
    env = {"CLAVE_TEST_PAUSE_AT": step} if step != "booting" else None
    proc, _, err = cli.popen("create", "--bundle", str(cli.bundle), cid, name="crash", handler=True, env=env)
    try:
        if step == "booting":
            t = trace(cli, cid, timeout=60, need_qemu=False)

            def qemu_up() -> bool:  # vm.json names the QEMU of the moment (a template's clone, or a boot)
                try:
                    t.qemu = int(json.loads(Path(t.vm_dir, "vm.json").read_text()).get("pid") or 0)
                except (OSError, ValueError):
                    return False
                return bool(t.qemu) and alive(t.qemu)

            wait_for(qemu_up, "qemu", timeout=60)
        else:
            def stopped() -> bool:
                assert proc.poll() is None, err.read_text()
                return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"

            wait_for(stopped, f"create to stop at {step}", timeout=60)
            t = trace(cli, cid, timeout=5, need_qemu=False)
            if step == "after-rootfs-image":
                assert os.path.exists(t.layer) and os.path.exists(t.binds)
    finally:
        proc.kill()
        proc.wait()
    cli("delete", "--force", cid)
    assert_gone(t, timeout=60)
    def ours() -> list[str]:  # qemu names the VM dir, the keeper (forked by create) the container id
        reap_children()
        return [c for _, c in commands() if t.vm_dir in c or f" {cid} " in c]

    wait_for(lambda: not ours(), "every process of the container to go", timeout=60)
    assert not Path(t.vm_dir).exists()


