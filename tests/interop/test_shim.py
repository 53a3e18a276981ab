"""containerd-shim-clave-v2 under a real containerd: `ctr run --runtime io.containerd.clave.v2`, tty and not,
exec, ps, pause/resume, metrics, kill, delete, events in order, one shim per pod, enclave containers."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Containerd, shim_pids, wait_for  # tests/interop is not a package: its conftest is top-level

RUNTIME = "io.containerd.clave.v2"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _run(containerd: Containerd, rootfs: Path, flags: list[str], cid: str, *command: str,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`ctr run --rootfs`: flags first, then the rootfs path (--rootfs is a switch), the id and the command."""
    return containerd.ctr("run", "--runtime", RUNTIME, *flags, "--rootfs", str(rootfs), cid, *command,
                          timeout=timeout)


def _status(containerd: Containerd, container_id: str) -> str:
    for line in containerd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return fields[-1]
    return ""


def _assert_gone(containerd: Containerd, container_id: str) -> None:
    """No shim serving the container, no engine state, no cgroup (the shim exits just after its last reply)."""
    state = Path(f"/run/containerd/clave/{containerd.namespace}/{container_id}")

    def leftovers() -> list[str]:
        found = [f"shim {pid}" for pid in shim_pids(containerd.namespace, container_id)]
        found += [f"state {state}"] if state.exists() else []
        return found + [f"cgroup {c}" for c in containerd.cgroups(container_id)]

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == []


def _remove(containerd: Containerd, cid: str) -> None:
    """Kill, delete and forget a task, then check nothing of it is left."""
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    wait_for(lambda: _status(containerd, cid) in ("STOPPED", ""), "the task to stop")
    containerd.ctr("task", "delete", "--force", cid)
    containerd.ctr("container", "delete", cid)
    _assert_gone(containerd, cid)


def test_run_rm_output_and_exit_code(containerd: Containerd, busybox_rootfs: Path) -> None:
    cid = _id("rm")
    result = _run(containerd, busybox_rootfs, ["--rm"], cid, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "out\n"
    assert "err" in result.stderr
    _assert_gone(containerd, cid)


def test_detached_task_verbs(containerd: Containerd, busybox_rootfs: Path) -> None:
    cid = _id("verbs")
    assert _run(containerd, busybox_rootfs, ["-d"], cid, "sleep", "300").returncode == 0
    try:
        assert _status(containerd, cid) == "RUNNING"
        exec_result = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo in exec; exit 5")
        assert exec_result.returncode == 5 and exec_result.stdout == "in exec\n", exec_result.stderr
        ps = containerd.ctr("task", "ps", cid, check=True).stdout.split()
        assert any(p.isdigit() for p in ps)
        containerd.ctr("task", "pause", cid, check=True)
        assert _status(containerd, cid) == "PAUSED"
        containerd.ctr("task", "resume", cid, check=True)
        assert _status(containerd, cid) == "RUNNING"
        metrics = containerd.ctr("task", "metrics", cid, check=True).stdout
        assert "memory.usage_in_bytes" in metrics and "pids.current" in metrics
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        wait_for(lambda: _status(containerd, cid) == "STOPPED", "the task to stop")
    finally:
        containerd.ctr("task", "delete", "--force", cid)
        containerd.ctr("container", "delete", cid)
    _assert_gone(containerd, cid)


def test_terminal(containerd: Containerd, busybox_rootfs: Path) -> None:
    cid = _id("tty")
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("ctr", ["ctr", "--address", containerd.address, "-n", containerd.namespace, "run", "--rm", "-t",
                          "--runtime", RUNTIME, "--rootfs", str(busybox_rootfs), cid, "sh", "-c",
                          "tty; stty size; exit 3"])  # --rootfs is a switch: the path follows the flags
    output = b""
    deadline = time.monotonic() + 20
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
    text = output.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert os.waitstatus_to_exitcode(status) == 3
    _assert_gone(containerd, cid)


def test_events_in_order(containerd: Containerd, busybox_rootfs: Path) -> None:
    cid = _id("ev")
    with tempfile.TemporaryFile("w+") as out:
        watcher = subprocess.Popen(["ctr", "--address", containerd.address, "events"], stdout=out,
                                   stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            assert _run(containerd, busybox_rootfs, ["-d"], cid, "sleep", "300").returncode == 0
            containerd.ctr("task", "exec", "--exec-id", "x", cid, "true", check=True)
            containerd.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
            wait_for(lambda: _status(containerd, cid) == "STOPPED", "the task to stop")
            containerd.ctr("task", "delete", cid, check=True)
            containerd.ctr("container", "delete", cid, check=True)
            time.sleep(0.3)
        finally:
            watcher.terminate()
            watcher.wait(timeout=5)
        out.seek(0)
        # Lines read "<date> <time> +0000 UTC <namespace> <topic> <event>".
        topics = [next(f for f in line.split() if f.startswith("/")) for line in out if cid in line]
    tasks = [t for t in topics if t.startswith("/tasks/")]
    expected = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                "/tasks/exit", "/tasks/delete"]
    assert tasks == expected, topics


def test_one_shim_per_pod(containerd: Containerd, busybox_rootfs: Path) -> None:
    sandbox = _id("pod")
    members = [sandbox, _id("app")]
    try:
        for cid in members:
            result = _run(containerd, busybox_rootfs, ["-d", "--annotation", f"io.kubernetes.cri.sandbox-id={sandbox}"],
                          cid, "sleep", "300")
            assert result.returncode == 0, result.stderr
        addresses = {(containerd.bundle_dir(cid) / "address").read_text() for cid in members}
        assert len(addresses) == 1, addresses
        assert len(shim_pids(containerd.namespace)) == 1
    finally:
        for cid in reversed(members):
            containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
            wait_for(lambda c=cid: _status(containerd, c) in ("STOPPED", ""), "the task to stop")
            containerd.ctr("task", "delete", "--force", cid)
            containerd.ctr("container", "delete", cid)
    for cid in members:
        _assert_gone(containerd, cid)


@pytest.fixture(scope="module")
def skeleton_pal() -> Iterator[Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the skeleton PAL")
    directory = Path(tempfile.mkdtemp(prefix="clave-shim-pal-"))
    directory.chmod(0o755)
    pal = directory / "liberpal-skeleton.so"
    source = Path(__file__).resolve().parents[1] / "enclave" / "skeleton_pal.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-DPAL_API_VERSION=2", "-o", str(pal), str(source)], check=True)
    yield pal
    shutil.rmtree(directory)


def test_enclave_container_through_the_shim(containerd: Containerd, busybox_rootfs: Path, skeleton_pal: Path) -> None:
    cid = _id("encl")
    log = busybox_rootfs / "tmp" / f"{cid}.log"
    result = _run(containerd, busybox_rootfs, ["--rm",
                  "--annotation", "enclave.type=software",
                  "--annotation", f"enclave.runtime.path={skeleton_pal}",
                  "--annotation", f"enclave.runtime.args=log=/tmp/{cid}.log"],
                  cid, "/bin/sh", "-c", "echo from the enclave; exit 4")
    try:
        assert result.returncode == 4, result.stderr
        assert result.stdout == "from the enclave\n"
        calls = log.read_text()
        assert "pal_create_process path=/bin/sh" in calls and "pal_destroy" in calls
    finally:
        log.unlink(missing_ok=True)
    _assert_gone(containerd, cid)


def test_python_enclave_app_through_the_shim(containerd: Containerd, tmp_path: Path) -> None:
    """`ctr run` with the wasm annotation runs an image's `python3 app.py` in the WebAssembly enclave."""
    pytest.importorskip("wasmtime")
    from clave.enclave.wasm import interpreters
    from clave.tools import bundles

    try:
        interpreters.PYTHON.module_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    bundle = tmp_path / "bundle"
    app = "import sys\nprint('enclaved python', sys.platform, sys.argv[1:])\nsys.exit(6)\n"
    bundles.make_app_bundle(str(bundle), {"/app/app.py": app}, ["python3", "/app/app.py", "x"])
    key = tmp_path / "signer.pem"
    clave = str(Path(sys.executable).parent / "clave")
    subprocess.run([clave, "enclave", "keygen", "--out", str(key)], check=True, capture_output=True)
    subprocess.run([clave, "enclave", "sign", "--key", str(key), str(bundle)], check=True, capture_output=True)
    cid = _id("py")
    result = _run(containerd, bundle / "rootfs", ["--rm", "--annotation", "enclave.type=wasm"], cid,
                  "python3", "/app/app.py", "x", timeout=60)
    assert result.returncode == 6, result.stderr
    assert result.stdout == "enclaved python wasi ['x']\n"
    _assert_gone(containerd, cid)


@pytest.mark.parametrize("value", [1000, 2147483647, 2147483648, 4294967295])
def test_user_ids_validated_like_runc(containerd: Containerd, busybox_rootfs: Path, tmp_path: Path,
                                      value: int) -> None:
    """A spec with process.user through the clave shim and through the runc.v2 shim (`ctr run --config`): the
    same ids run, the same are refused (one line naming process.user.uid), and nothing is left behind."""
    from clave.config.defaults import default_spec

    spec = default_spec()
    spec["process"].update(terminal=False, args=["sh", "-c", "id -u; id -g"], user={"uid": value, "gid": value})
    spec["root"] = {"path": str(busybox_rootfs)}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    results = {}
    for runtime in (RUNTIME, "io.containerd.runc.v2"):
        cid = _id("uid")
        results[runtime] = containerd.ctr("run", "--rm", "--runtime", runtime, "--config",
                                          str(tmp_path / "config.json"), cid)
        containerd.ctr("task", "delete", "--force", cid)
        containerd.ctr("container", "delete", cid)
        _assert_gone(containerd, cid)
    clave_result, runc_result = results[RUNTIME], results["io.containerd.runc.v2"]
    if value <= 2147483647:
        assert clave_result.returncode == runc_result.returncode == 0, (clave_result.stderr, runc_result.stderr)
        assert clave_result.stdout.split() == runc_result.stdout.split() == [str(value)] * 2
    else:
        assert runc_result.returncode != 0, runc_result.stdout
        assert clave_result.returncode != 0, clave_result.stdout
        assert "process.user.uid" in clave_result.stderr and "0-2147483647" in clave_result.stderr


@pytest.mark.parametrize("value", [2147483648, 4294967295, 4294967296, -1])
def test_exec_user_ids_validated(containerd: Containerd, busybox_rootfs: Path, value: int) -> None:
    """The shim's Exec refuses a process whose uid is out of runc's range (ctr cannot send one: it resolves
    such a --user as a name, so the request goes straight to the shim's socket), and nothing of it runs."""
    from clave.proto.generated import containerd_task_v2 as task
    from clave.proto.generated.google_protobuf import Any as AnyMessage
    from clave.proto.generated.google_protobuf import Empty
    from clave.ttrpc import Client, Code, TtrpcError

    cid = _id("xuid")
    assert _run(containerd, busybox_rootfs, ["-d"], cid, "sleep", "300").returncode == 0
    try:
        address = (containerd.bundle_dir(cid) / "address").read_text().strip()
        process = {"args": ["id", "-u"], "cwd": "/", "user": {"uid": value, "gid": 0}}
        spec = AnyMessage(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                          value=json.dumps(process).encode())
        with Client.connect(address) as client, pytest.raises(TtrpcError) as err:
            client.invoke(task.TaskService.NAME, "Exec", task.ExecProcessRequest(id=cid, exec_id="u", spec=spec),
                          Empty, timeout=10)
        assert err.value.code == Code.INVALID_ARGUMENT
        assert "process.user.uid" in str(err.value) and "0-2147483647" in str(err.value)
        ps = containerd.ctr("task", "ps", cid, check=True).stdout.split()
        assert len([p for p in ps if p.isdigit()]) == 1  # only the sleep
    finally:
        _remove(containerd, cid)


@pytest.mark.parametrize("fd", [3, 4, 5, 6, 7])
def test_cwd_through_a_leaked_fd_is_refused(containerd: Containerd, busybox_rootfs: Path, fd: int) -> None:
    """CVE-2024-21626 through the shim: Create with `--cwd /proc/self/fd/N`, and Exec with it, never run."""
    cid = _id("cwd")
    result = _run(containerd, busybox_rootfs, ["--rm", "--cwd", f"/proc/self/fd/{fd}"], cid, "sh", "-c", "ls ../../../")
    assert result.returncode != 0 and result.stdout == "", result.stdout
    assert "cwd" in result.stderr
    containerd.ctr("task", "delete", "--force", cid)
    containerd.ctr("container", "delete", cid)
    _assert_gone(containerd, cid)
    cid = _id("xcwd")
    assert _run(containerd, busybox_rootfs, ["-d"], cid, "sleep", "300").returncode == 0
    try:
        result = containerd.ctr("task", "exec", "--exec-id", "c", "--cwd", f"/proc/self/fd/{fd}", cid,
                                "sh", "-c", "ls ../../../")
        assert result.returncode != 0 and result.stdout == "", result.stdout
        ps = containerd.ctr("task", "ps", cid, check=True).stdout.split()
        assert len([p for p in ps if p.isdigit()]) == 1
    finally:
        _remove(containerd, cid)


def test_engine_warnings_reach_containerds_log(containerd: Containerd, busybox_rootfs: Path,
                                               skeleton_pal: Path) -> None:
    """The shim hands the engine a logger on containerd's shim log: the INSECURE warning of a software enclave
    (an engine warning) shows in containerd's own log, as a Go shim's warnings do."""
    cid = _id("warn")
    result = _run(containerd, busybox_rootfs, ["--rm", "--annotation", "enclave.type=software",
                  "--annotation", f"enclave.runtime.path={skeleton_pal}"], cid, "/bin/sh", "-c", "exit 0")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: f"container {cid}: enclave type software is INSECURE" in containerd.log_path.read_text(),
             "the warning in containerd's log")
    _assert_gone(containerd, cid)


def test_runtime_options_choose_the_handler(containerd: Containerd, busybox_rootfs: Path, tmp_path: Path,
                                            skeleton_pal: Path) -> None:
    """containerd passes the runtime's options (runtimeoptions.v1 ConfigPath: the files `clave node install`
    writes) and the shim takes the handler from them. `enclave` cannot be imposed on a container without enclave
    settings (it runs natively, as a pod's sandbox container must), and runs one with them through its PAL; `vm`
    runs it in a VM; a handler this build does not have is refused in one line."""
    from clave.k8s.runtimeconfig import RuntimeConfig, render

    def run(handler: str, *flags: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / f"runtime-{handler}.toml"
        config.write_text(render(RuntimeConfig(f"clave-{handler}", handler)))
        cid = _id("opt")
        result = _run(containerd, busybox_rootfs, ["--rm", "--runtime-config-path", str(config), *flags], cid,
                      "/bin/sh", "-c", "echo ran")
        containerd.ctr("task", "delete", "--force", cid)
        containerd.ctr("container", "delete", cid)
        _assert_gone(containerd, cid)
        return result

    assert run("native").stdout == "ran\n"
    assert run("enclave").stdout == "ran\n"
    enclave = run("enclave", "--annotation", "enclave.type=software", "--annotation",
                  f"enclave.runtime.path={skeleton_pal}")
    assert enclave.returncode == 0 and enclave.stdout == "ran\n", enclave.stderr
    vm = run("vm")  # a VM of its own (the vm handler): the same output through the guest
    assert vm.returncode == 0 and vm.stdout == "ran\n", vm.stderr
    unknown = tmp_path / "runtime-other.toml"
    unknown.write_text('version = 1\nruntime = "clave-other"\nhandler = "gvisor"\n')
    cid = _id("opt")
    refused = _run(containerd, busybox_rootfs, ["--rm", "--runtime-config-path", str(unknown)], cid, "/bin/true")
    containerd.ctr("container", "delete", cid)
    assert refused.returncode != 0 and "handler must be one of native, enclave, vm, not 'gvisor'" in refused.stderr
    _assert_gone(containerd, cid)
