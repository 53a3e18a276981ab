"""Container-breakout classes runc has fixed, each tried for real against Clave and against Debian's runc.

- leaked fds + cwd (CVE-2024-21626): `process.cwd` / `exec --cwd` through /proc/self/fd/N;
- the runtime's own executable (CVE-2019-5736): /proc/self/exe as entrypoint, exec'd program, `#!` interpreter
  and ELF interpreter, in a rootfs that could run the host's Python (its loader and libraries are there);
- the joining process during exec (CVE-2016-9962): /proc/<pid>/{fd,environ,mem} and ptrace while paused;
- mount target races (CVE-2021-30465, CVE-2025-31133): a container sharing a volume swaps a mount destination
  for a symlink in a loop while another is created; a /dev/null that is a symlink to a procfs file;
- inheritable capabilities (CVE-2022-29162); console socket abuse.

Each test asserts that nothing outside the container was read, written or mounted, and records what runc does.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from security.harness import CLAVE, Runner, processes_in_cgroup

MARKER = "HOST-PYTHON-RAN"
PAUSE = "CLAVE_TEST_PAUSE_AT"


def _needs_runc() -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc (the reference) is not installed")


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in stderr
    return lines[0]


def _wait_state(pid: int, letter: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state_letter(pid) == letter:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not reach state {letter}")


def _start_detached(runner: Runner, name: str, config: dict[str, Any]) -> int:
    bundle = runner.bundle(name, config)
    assert runner.create(name, bundle, "--pid-file", str(bundle / "pid")) == ""
    assert runner.clave("start", name).returncode == 0
    return int((bundle / "pid").read_text())


def _runc_detached(runner: Runner, name: str, config: dict[str, Any]) -> None:
    bundle = runner.bundle(name, config)
    with open(bundle / "runc.err", "w+") as err:
        code = subprocess.call(["runc", "--root", str(runner.base / "runc-state"), "run", "--detach", "--bundle",
                                str(bundle), name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=err, timeout=30)
        err.seek(0)
        assert code == 0, err.read()


# ------------------------------------------------------------------ CVE-2024-21626: leaked fds and cwd

LEAK_FDS = range(3, 9)


@pytest.mark.parametrize("fd", LEAK_FDS)
def test_cwd_through_a_leaked_fd_is_refused(runner: Runner, fd: int) -> None:
    _needs_runc()
    script = "ls ../../../; cat ../../../../../../etc/shadow"
    config = runner.config("sh", "-c", script)
    config["process"]["cwd"] = f"/proc/self/fd/{fd}"
    reference = runner.reference_run(f"cwd{fd}", json.loads(json.dumps(config)))
    result = runner.run(f"cwd{fd}", config)
    assert reference.returncode != 0, f"runc ran with cwd /proc/self/fd/{fd}: {reference.stdout}"
    assert result.returncode != 0, f"clave ran with cwd /proc/self/fd/{fd}: {result.stdout}"
    assert result.stdout == ""
    assert "cwd" in _one_line(result.stderr)
    assert runner.leftovers(f"cwd{fd}") == []


@pytest.fixture
def twins(runner: Runner) -> str:
    """A running clave container and its runc twin (``<id>-runc``), for exec."""
    _needs_runc()
    _start_detached(runner, "ex", runner.config("sleep", "300"))
    _runc_detached(runner, "ex-runc", runner.config("sleep", "300"))
    return "ex"


@pytest.mark.parametrize("fd", LEAK_FDS)
def test_exec_cwd_through_a_leaked_fd_is_refused(runner: Runner, twins: str, fd: int, tmp_path: Path) -> None:
    command = ["sh", "-c", "ls ../../../"]
    reference = runner.runc("exec", "--cwd", f"/proc/self/fd/{fd}", f"{twins}-runc", *command)
    result = runner.clave("exec", "--cwd", f"/proc/self/fd/{fd}", twins, *command)
    assert reference.returncode != 0 or "bin" in reference.stdout.split(), reference  # runc: refused, or inside
    assert result.returncode != 0 and result.stdout == "", result.stdout
    assert "cwd" in _one_line(result.stderr)
    process = runner.config(*command)["process"]
    process["cwd"] = f"/proc/self/fd/{fd}"
    (tmp_path / "process.json").write_text(json.dumps(process))
    result = runner.clave("exec", "--process", str(tmp_path / "process.json"), twins)
    assert result.returncode != 0 and result.stdout == ""
    assert len(processes_in_cgroup(f"/{runner.group}/{twins}")) == 1  # nothing of the refused execs runs


def test_cwd_symlinked_outside_stays_inside(runner: Runner, tmp_path: Path) -> None:
    """An image whose cwd is a symlink to an absolute host-looking path resolves inside its own root."""
    rootfs = tmp_path / "rootfs"
    shutil.copytree(runner.rootfs, rootfs, symlinks=True)
    (rootfs / "work").symlink_to(str(tmp_path))  # a host path: must mean <rootfs>/<tmp_path>
    config = runner.config("pwd")
    config["root"]["path"] = str(rootfs)
    config["process"]["cwd"] = "/work"
    result = runner.run("cwdlink", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path)
    assert (rootfs / str(tmp_path).lstrip("/")).is_dir()  # created inside the rootfs, as runc does


def _skeleton_pal(tmp_path: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the skeleton PAL")
    directory = tmp_path / "pal"
    directory.mkdir()
    directory.chmod(0o755)
    pal = directory / "liberpal-skeleton.so"
    source = Path(__file__).resolve().parents[1] / "enclave" / "skeleton_pal.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-DPAL_API_VERSION=2", "-o", str(pal), str(source)], check=True)
    return pal


@pytest.mark.parametrize("fd", [3, 4, 5, 6])
def test_enclave_cwd_through_a_leaked_fd_is_refused(runner: Runner, tmp_path: Path, fd: int) -> None:
    """The enclave init keeps its PAL (and agent socket) open: the working directory is still refused."""
    pal = _skeleton_pal(tmp_path)
    config = runner.config("/bin/sh", "-c", "ls ../../../")
    config["process"]["cwd"] = f"/proc/self/fd/{fd}"
    config["annotations"] = {"enclave.type": "software", "enclave.runtime.path": str(pal)}
    result = runner.run(f"ecwd{fd}", config)
    assert result.returncode != 0 and result.stdout == "", result.stdout
    errors = [line for line in result.stderr.splitlines() if "INSECURE" not in line]  # the software-type warning
    assert "cwd" in _one_line("\n".join(errors))
    assert runner.leftovers(f"ecwd{fd}") == []


# ------------------------------------------------------------------ CVE-2019-5736: /proc/self/exe


@pytest.fixture
def python_capable_rootfs(runner: Runner, tmp_path: Path) -> Path:
    """The busybox rootfs plus the dynamic loader and every library the host's Python needs, so that the
    host's interpreter *could* run in it: the accident (no ld.so in busybox) no longer protects."""
    python = os.path.realpath("/proc/self/exe")
    rootfs = tmp_path / "pyroot"
    shutil.copytree(runner.rootfs, rootfs, symlinks=True)
    ldd = subprocess.run(["ldd", python], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        path = next((part for part in line.split() if part.startswith("/")), None)
        if path:
            dest = rootfs / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    shutil.copy2(python, rootfs / "bin" / "python-copy")  # a copy: proves the libraries suffice
    (rootfs / "bin" / "evil").write_text(f"#!/proc/self/exe\nprint('{MARKER}')\n")
    (rootfs / "bin" / "evil").chmod(0o755)
    if shutil.which("gcc"):
        source = tmp_path / "interp.c"
        source.write_text("int main(void) { return 0; }\n")
        subprocess.run(["gcc", "-o", str(rootfs / "bin" / "evil-elf"), str(source),
                        "-Wl,--dynamic-linker=/proc/self/exe"], check=True)
    return rootfs


def _python_config(runner: Runner, rootfs: Path, *args: str) -> dict[str, Any]:
    config = runner.config(*args)
    config["root"]["path"] = str(rootfs)
    return config


def test_the_rootfs_could_run_a_python(runner: Runner, python_capable_rootfs: Path) -> None:
    """A copy of the host's interpreter starts in this rootfs (it then stops for want of its stdlib, saying
    "Python path configuration"): so only Clave's defence keeps the host's own binary from running here."""
    config = _python_config(runner, python_capable_rootfs, "/bin/python-copy", "-S", "-c", f"print('{MARKER}')")
    result = runner.run("pycopy", config)
    assert "Python path configuration" in result.stderr, result.stderr


@pytest.mark.parametrize("entrypoint", ["/proc/self/exe", "/proc/1/exe", "/bin/evil", "/bin/evil-elf"])
def test_entrypoint_never_runs_the_runtime(runner: Runner, python_capable_rootfs: Path, entrypoint: str) -> None:
    _needs_runc()
    if entrypoint == "/bin/evil-elf" and not (python_capable_rootfs / "bin" / "evil-elf").exists():
        pytest.skip("gcc builds the ELF whose interpreter is /proc/self/exe")
    args = (entrypoint, "-S", "-c", f"print('{MARKER}')")
    name = "exe-" + entrypoint.rsplit("/", 1)[-1]
    reference = runner.reference_run(name, _python_config(runner, python_capable_rootfs, *args))
    result = runner.run(name, _python_config(runner, python_capable_rootfs, *args))
    assert MARKER not in reference.stdout  # runc runs its own sealed memfd copy, never a host file
    assert result.returncode != 0, result.stdout
    assert MARKER not in result.stdout and "Python" not in result.stdout + result.stderr
    assert runner.leftovers(name) == []


@pytest.mark.parametrize("program", ["/proc/self/exe", "/bin/evil", "/bin/evil-elf"])
def test_exec_never_runs_the_runtime(runner: Runner, python_capable_rootfs: Path, program: str) -> None:
    if program == "/bin/evil-elf" and not (python_capable_rootfs / "bin" / "evil-elf").exists():
        pytest.skip("gcc builds the ELF whose interpreter is /proc/self/exe")
    _start_detached(runner, "exe-exec", _python_config(runner, python_capable_rootfs, "sleep", "300"))
    result = runner.clave("exec", "exe-exec", program, "-S", "-c", f"print('{MARKER}')")
    assert result.returncode != 0 and MARKER not in result.stdout, result


def test_a_trampoline_reached_from_inside_cannot_be_written(runner: Runner, python_capable_rootfs: Path) -> None:
    """What /proc/self/exe of a container process can reach at worst is the sealed trampoline."""
    from clave.linux import trampoline

    if not trampoline.available():
        pytest.skip("the trampoline is x86_64 code")
    fd = trampoline.sealed_fd()
    try:
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)  # a reopen for writing cannot write either
        try:
            with pytest.raises(PermissionError):
                os.write(reopened, b"x")
        finally:
            os.close(reopened)
    finally:
        os.close(fd)


def test_trampoline_matches_its_source(tmp_path: Path) -> None:
    from clave.linux import trampoline

    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("binutils (as, objcopy) reassemble the trampoline")
    source = Path(__file__).with_name("trampoline.s")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "t.o"), str(source)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "t.o"), str(tmp_path / "t.bin")],
                   check=True)
    assert (tmp_path / "t.bin").read_bytes() == trampoline.X86_64_CODE


# ------------------------------------------------------------------ CVE-2016-9962: the joining process


def test_paused_exec_is_out_of_the_containers_reach(runner: Runner, tmp_path: Path) -> None:
    """While `clave exec` is stopped inside the container (after joining, before chdir and before execve), the
    container's own root process, watching for it, can neither ptrace it nor open its fds, environ or memory."""
    out = tmp_path / "out"
    out.mkdir()
    watcher = ("while :; do for s in /proc/[0-9]*/status; do p=${s%/status}; "
               "if grep -q '^State:.*stopped' $s 2>/dev/null; then n=${p#/proc/}; "
               "{ for f in $p/fd/*; do readlink $f || echo no-link; head -c1 $f </dev/null || echo no-open; done; "
               "cat $p/environ || echo no-environ; head -c1 $p/mem || echo no-mem; "
               "readlink $p/cwd || echo no-cwd; /bin/probe ptrace $n; } "
               "> /out/probe.$n 2>&1; fi; done; sleep 0.05; done")
    config = runner.config("sh", "-c", watcher)
    config["mounts"].append({"destination": "/out", "type": "bind", "source": str(out), "options": ["rbind"]})
    _start_detached(runner, "dump", config)
    for step in ("exec-before-cwd", "exec-before-execve"):
        exec_proc = subprocess.Popen([CLAVE, "--root", str(runner.root), "exec", "dump", "sleep", "1"],
                                     env={**os.environ, PAUSE: step, "SECRET_TOKEN": "s3cret"},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            inner = _pid_in_container(_paused_member(runner, "dump"))
            result = out / f"probe.{inner}"
            deadline = time.monotonic() + 10
            while not (result.exists() and result.read_text().strip().endswith(("EPERM", "ok"))):
                assert time.monotonic() < deadline, f"{step}: the watcher did not probe the paused process"
                time.sleep(0.05)
            text = result.read_text()
            assert "s3cret" not in text and "exec.fifo" not in text and "pipe:" not in text, f"{step}: {text}"
            assert text.strip().splitlines()[-1] == "EPERM", f"{step}: ptrace attached: {text}"
            for refused in ("no-link", "no-open", "no-environ", "no-mem", "no-cwd"):
                assert refused in text, f"{step}: the container could read what {refused} names: {text}"
            leaked = [line for line in text.splitlines() if line.startswith("/") or ":[" in line]
            assert leaked == [], f"{step}: fd targets seen from inside: {leaked}"
            result.unlink()
        finally:
            exec_proc.kill()
            exec_proc.wait()
            for pid in processes_in_cgroup(f"/{runner.group}/dump"):
                if _state_letter(pid) == "T":
                    os.kill(pid, signal.SIGKILL)


def _state_letter(pid: int) -> str:
    """A process's state letter, or "" once it is gone (the watcher's own short-lived children come and go)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _paused_member(runner: Runner, name: str) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for pid in processes_in_cgroup(f"/{runner.group}/{name}"):
            if _state_letter(pid) == "T":
                return pid
        time.sleep(0.01)
    raise AssertionError("the exec'd process did not pause")


def _pid_in_container(host_pid: int) -> int:
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError("no NSpid")


# ------------------------------------------------------------------ mount target races


def test_mount_destination_swapped_by_a_neighbour_stays_inside(runner: Runner, tmp_path: Path) -> None:
    """CVE-2021-30465: container B, sharing a volume with A, swaps A's mount destination between a directory
    and a symlink to a host directory while A is created again and again; no mount lands on the host."""
    _needs_runc()
    volume = tmp_path / "volume"
    volume.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("host file\n")
    swapper = runner.config("sh", "-c", f"cd /vol; while :; do rm -rf t; ln -s {victim} t; rm -f t; mkdir t; done")
    swapper["mounts"].append({"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind"]})
    _start_detached(runner, "swapper", swapper)
    runc_created: set[str] = set()
    try:
        for runtime, attempts in (("clave", 25), ("runc", 10)):
            for i in range(attempts):
                config = runner.config("true")
                config["mounts"] += [
                    {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind"]},
                    {"destination": "/vol/t/m", "type": "tmpfs", "source": "tmpfs"},
                ]
                name = f"race-{runtime}-{i}"
                if runtime == "clave":
                    runner.run(name, config)
                else:
                    runner.reference_run(name, config)
                    runner.runc("delete", "--force", f"{name}-runc")
                mounts = Path("/proc/self/mountinfo").read_text()
                assert str(victim) not in mounts, f"{runtime}: a mount landed on the host at {victim}"
                created = sorted(set(os.listdir(victim)) - {"keep"})
                if runtime == "runc":
                    # Debian's runc 1.1.5 loses this race now and then: its MkdirAll follows the swapped link and
                    # makes an empty directory on the host (CVE-2024-45310, fixed in runc 1.1.14). Recorded, then
                    # cleaned; it never mounts there.
                    runc_created.update(created)
                    for leftover in created:
                        (victim / leftover).rmdir()
                else:
                    assert created == [], f"clave wrote into the host's {victim}: {created}"
    finally:
        runner.clave("kill", "swapper", "KILL")
    print(f"runc 1.1.5 created on the host during the race: {sorted(runc_created) or 'nothing this time'}")


def test_dev_null_symlink_to_procfs_cannot_unmask(runner: Runner, tmp_path: Path) -> None:
    """CVE-2025-31133: with /dev from a volume whose null is a symlink to a procfs file, masking must not bind
    that file over the masked paths (it would make /proc/sys/kernel/core_pattern writable as /proc/kcore)."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "null").symlink_to("/proc/sys/kernel/core_pattern")
    config = runner.config("cat", "/proc/kcore")
    config["mounts"].append({"destination": "/dev", "type": "bind", "source": str(dev), "options": ["rbind"]})
    result = runner.run("devnull", config)
    assert result.returncode != 0, result.stdout
    assert "null device" in _one_line(result.stderr)
    assert runner.leftovers("devnull") == []


# ------------------------------------------------------------------ CVE-2022-29162: inheritable capabilities


def _run_with_inheritable(runner: Runner, name: str, config: dict[str, Any], reference: bool) -> str:
    """Run with the caller's inheritable set holding CAP_NET_RAW and CAP_SYS_ADMIN (as a misconfigured
    caller could); returns the container's CapInh line."""
    bundle = runner.bundle(name, config)

    def grant() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        libc.syscall(125, header, data)  # capget
        data[2] |= (1 << 13) | (1 << 21)  # inheritable: CAP_NET_RAW, CAP_SYS_ADMIN
        libc.syscall(126, header, data)  # capset

    command = (["runc", "--root", str(runner.base / "runc-state")] if reference else [CLAVE, "--root",
               str(runner.root)]) + ["run", "--bundle", str(bundle), name]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=grant, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("CapInh"))


@pytest.mark.parametrize("with_caps", [True, False])
def test_inheritable_set_stays_empty(runner: Runner, with_caps: bool) -> None:
    _needs_runc()
    config = runner.config("cat", "/proc/self/status")
    if not with_caps:
        del config["process"]["capabilities"]
    assert int(_run_with_inheritable(runner, f"inh{with_caps:d}", config, False), 16) == 0
    runc_inh = int(_run_with_inheritable(runner, f"inh{with_caps:d}-runc", json.loads(json.dumps(config)), True), 16)
    if with_caps:
        assert runc_inh == 0  # runc empties it when the config names capabilities
    # (without a capabilities section runc 1.1.5 leaves the caller's inheritable set in place; Clave does not)


# ------------------------------------------------------------------ console socket abuse


def test_console_socket_that_is_not_a_socket(runner: Runner, tmp_path: Path) -> None:
    _needs_runc()
    not_a_socket = tmp_path / "console"
    not_a_socket.write_text("")
    config = runner.config("true")
    config["process"]["terminal"] = True
    bundle = runner.bundle("cons", config)
    message = runner.create("cons", bundle, "--console-socket", str(not_a_socket))
    assert "console socket" in message and len(message.splitlines()) == 1, message
    assert runner.leftovers("cons") == []
    twin = runner.bundle("cons-runc", json.loads(json.dumps(config)))
    result = subprocess.run(["runc", "--root", str(runner.base / "runc-state"), "create", "--bundle", str(twin),
                             "--console-socket", str(not_a_socket), "cons-runc"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=30)
    assert result.returncode != 0


def test_console_peer_sending_garbage_and_master_never_inside(runner: Runner, tmp_path: Path) -> None:
    """A console-socket peer that sends garbage back does not disturb create; the container holds only the pty
    slave, never the master (nor any socket)."""
    import socket

    path = tmp_path / "c.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received: list[int] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b"\xff" * 4096)  # garbage the runtime must not choke on
        fds = socket.recv_fds(conn, 1024, 4)[1]
        received.extend(fds)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    config = runner.config("sh", "-c", "ls -l /proc/self/fd/ > /dev/tty; sleep 300")
    config["process"]["terminal"] = True
    bundle = runner.bundle("tty", config)
    assert runner.create("tty", bundle, "--console-socket", str(path), "--pid-file", str(bundle / "pid")) == ""
    thread.join(timeout=10)
    server.close()
    assert len(received) == 1
    master = received[0]
    assert runner.clave("start", "tty").returncode == 0
    listing = b""
    deadline = time.monotonic() + 10
    while b"sleep" not in listing and b"pts" not in listing and time.monotonic() < deadline:
        try:
            listing += os.read(master, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    os.close(master)
    text = listing.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert "ptmx" not in text and "socket:" not in text, text


# ------------------------------------------------------------------ the fd audit


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
    return out


def _is_dir_fd(pid: int, fd: int) -> bool:
    try:
        return stat.S_ISDIR(os.stat(f"/proc/{pid}/fd/{fd}").st_mode)
    except OSError:
        return False


def test_fd_audit_at_every_pause_point(runner: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    """The fds of the init at each step of create and start, and of an exec'd process: from the moment the
    working directory is entered, no directory fd and nothing of the host but the exec fifo is open.
    (The listing is what docs/security.md's audit describes; run with -s to see it.)"""
    report = []
    for step in ("after-fork", "after-hooks", "before-pid-file", "before-cwd", "before-execve"):
        name = f"audit-{step}"
        config = runner.config("sleep", "300")
        config["hooks"] = {"prestart": [{"path": "/bin/true"}]}
        bundle = runner.bundle(name, config)
        env = {**os.environ, PAUSE: step}
        in_init = step in ("before-cwd", "before-execve")
        with open(bundle / "create.err", "w+") as err:
            create = subprocess.Popen([CLAVE, "--root", str(runner.root), "create", "--bundle", str(bundle),
                                       "--pid-file", str(bundle / "pid"), name], env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        start = None
        try:
            if in_init:
                assert create.wait(timeout=30) == 0, (bundle / "create.err").read_text()
                start = subprocess.Popen([CLAVE, "--root", str(runner.root), "start", name],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                init = int((bundle / "pid").read_text())
            else:
                _wait_state(create.pid, "T")
                members = processes_in_cgroup(f"/{runner.group}/{name}")
                assert len(members) == 1, members
                init = members[0]
            if in_init:  # a pid namespace's init cannot stop itself: it renames itself and waits
                deadline = time.monotonic() + 15
                while Path(f"/proc/{init}/comm").read_text().strip() != "clave-paused":
                    assert time.monotonic() < deadline, f"the init did not reach {step}"
                    time.sleep(0.01)
            fds = _fds(init)
            report.append(f"{step}: " + ", ".join(f"{fd}={target}" for fd, target in sorted(fds.items())))
            for fd, target in fds.items():
                if fd <= 2:
                    continue
                allowed = target.startswith(("pipe:", "/dev/null", "anon_inode:")) or target.endswith("exec.fifo")
                if not in_init:  # until start: the state dir (O_PATH), and the init's own fds on the rootfs it builds
                    allowed = allowed or target == str(runner.root / name) or target.startswith(str(runner.rootfs))
                else:
                    allowed = allowed or target.startswith("/memfd:clave-exec")
                    assert not _is_dir_fd(init, fd), f"{step}: directory fd {fd} -> {target} open in the init"
                assert allowed, f"{step}: unexpected fd {fd} -> {target} in the init"
        finally:
            for process in (create, start):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            runner.clave("delete", "--force", name)
    with capsys.disabled():
        print("\n" + "\n".join(report))
