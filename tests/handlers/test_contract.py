"""The handler contract suite: every handler shows the same observable behaviour for every verb, through the
engine in-process (as the shim drives it), and fails with the same error classes.

Parametrized over native, enclave with a PAL (the skeleton PAL, v2), enclave with the WebAssembly runtime and
vm (a QEMU guest per container, chosen by the io.clave.handler annotation; needs a built guest). What a handler
cannot do is marked where the test meets it: the vm handler has no runtime of its own to ask for evidence
(attest is Unsupported, as for native).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clave.config.defaults import default_spec
from clave.engine.container import CreateOptions, Engine, ExecOptions
from clave.errors import AlreadyExists, ClaveError, InvalidArgument, NotFound, Unsupported, WrongState

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root")
HANDLERS = ["native", "enclave-pal", "enclave-wasm", "vm"]
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module", autouse=True)
def _subreaper() -> Iterator[None]:
    """As the shim is: the subreaper the containers' inits are re-parented to."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


@pytest.fixture(scope="module")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clave.tools.bundles import make_busybox_rootfs

    base = tmp_path_factory.mktemp("contract")
    base.chmod(0o755)
    return Path(make_busybox_rootfs(str(base / "rootfs")))


@pytest.fixture(scope="module")
def skeleton_pal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the skeleton PAL")
    directory = tmp_path_factory.mktemp("pal")
    directory.chmod(0o755)
    pal = directory / "liberpal-skeleton.so"
    source = Path(__file__).resolve().parents[1] / "enclave" / "skeleton_pal.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-DPAL_API_VERSION=2", "-o", str(pal), str(source)], check=True)
    return pal


class Case:
    """One handler's container: a bundle whose process runs until signalled, and a short program to exec."""

    def __init__(self, kind: str, base: Path, busybox: Path, pal: Path | None) -> None:
        self.kind = kind
        self.bundle = base / "bundle"
        self.bundle.mkdir()
        self.root = base / "state"
        self.engine = Engine(str(self.root))
        config = default_spec()
        config["process"]["terminal"] = False
        if kind == "enclave-wasm":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "enclave"))
            import _wasm_modules as wat

            rootfs = self.bundle / "rootfs"
            rootfs.mkdir()
            key = wat.make_key(base)
            wat.install(rootfs, "/app/spin.wasm", wat.spin(), key)
            wat.install(rootfs, "/app/exit3.wasm", wat.exit_with(3), key)
            config["process"]["args"] = ["/app/spin.wasm"]
            config["process"]["env"].append("ENCLAVE_TYPE=wasm")
            config["root"] = {"path": "rootfs", "readonly": True}
            self.exec_args = ["/app/exit3.wasm"]
        else:
            config["root"] = {"path": str(busybox), "readonly": True}
            config["process"]["args"] = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"]
            self.exec_args = ["/bin/sh", "-c", "exit 3"]
            if kind == "enclave-pal":
                assert pal is not None
                config["annotations"] = {"enclave.type": "software", "enclave.runtime.path": str(pal)}
            if kind == "vm":
                config["annotations"] = {"io.clave.handler": "vm"}
        self.config = config
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.null = os.open(os.devnull, os.O_RDWR)

    def create(self, cid: str) -> int:
        state = self.engine.create(cid, CreateOptions(bundle=str(self.bundle), stdio=(self.null,) * 3))
        return state.pid

    def status(self, cid: str) -> str:
        return str(self.engine.state(cid)["status"])

    def close(self) -> None:
        for cid in os.listdir(self.root) if self.root.exists() else []:
            try:
                self.engine.delete(cid, force=True)
            except ClaveError:
                pass
        os.close(self.null)


@pytest.fixture(params=HANDLERS)
def case(request: pytest.FixtureRequest, tmp_path: Path, busybox: Path) -> Iterator[Case]:
    if request.param == "enclave-wasm":
        pytest.importorskip("wasmtime")
    if request.param == "vm":
        from clave.vm.guest import build_guest

        try:
            build_guest()  # cached: built once per machine (a fresh one builds it here, before tests/vm)
        except ClaveError as exc:
            pytest.skip(f"no VM guest here: {exc}")
    pal = request.getfixturevalue("skeleton_pal") if request.param == "enclave-pal" else None
    c = Case(request.param, tmp_path, busybox, pal)
    yield c
    c.close()
    assert not c.root.exists() or os.listdir(c.root) == [], "state left behind"


def _wait_status(case: Case, cid: str, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while case.status(cid) != wanted:
        assert time.monotonic() < deadline, f"{case.kind}: {cid} never became {wanted}"
        time.sleep(0.02)


def test_lifecycle(case: Case) -> None:
    cid = f"life-{uuid.uuid4().hex[:6]}"
    pid = case.create(cid)
    assert pid > 0
    doc = case.engine.state(cid)
    assert (doc["status"], doc["pid"], doc["id"]) == ("created", pid, cid)
    assert ("enclave" in doc) == case.kind.startswith("enclave")
    assert ("vm" in doc) == (case.kind == "vm")
    case.engine.start(cid)
    assert case.status(cid) == "running"
    with pytest.raises(WrongState):
        case.engine.start(cid)
    assert pid in case.engine.pids(cid)
    case.engine.pause(cid)
    assert case.status(cid) == "paused"
    with pytest.raises(WrongState):
        case.engine.pause(cid)
    case.engine.resume(cid)
    assert case.status(cid) == "running"
    stats = case.engine.stats(cid)
    assert {"cpu", "memory", "pids"} <= set(stats) and stats["pids"]["current"] >= 1
    case.engine.update(cid, {"pids": {"limit": 100}})
    case.engine.kill(cid, signal.SIGKILL)
    case.engine.wait(cid)
    _wait_status(case, cid, "stopped")
    with pytest.raises(WrongState):
        case.engine.kill(cid, signal.SIGKILL)
    with pytest.raises(WrongState):
        case.engine.stats(cid)
    case.engine.delete(cid)
    with pytest.raises(NotFound):
        case.engine.state(cid)


def test_exec_and_its_status(case: Case, request: pytest.FixtureRequest) -> None:
    if case.kind == "enclave-wasm":
        # Found by this suite: when this pytest process has itself run WASI guests (tests/enclave does, in-process)
        # before it forks an enclave init, the init inherits wasmtime-wasi's global tokio runtime with its I/O
        # driver's fds gone, and creating the exec'd process panics ("failed to wake I/O driver: Bad file
        # descriptor") and aborts. `clave` and the shim never run WASI in the process that forks inits, so they
        # do not meet it; the case may fail here without failing the run until inits stop inheriting it.
        request.applymarker(pytest.mark.xfail(reason="inherited tokio runtime of an in-process WASI guest",
                                              strict=False))
    cid = f"exec-{uuid.uuid4().hex[:6]}"
    case.create(cid)
    case.engine.start(cid)
    process = dict(case.config["process"], args=case.exec_args)
    pid = case.engine.exec(cid, process, ExecOptions(stdio=(case.null,) * 3))
    assert pid > 0
    assert case.engine.wait(cid, pid) == 3
    with pytest.raises(InvalidArgument):
        case.engine.exec(cid, dict(process, user={"uid": 2**32 - 1, "gid": 0}), ExecOptions())
    case.engine.kill(cid, signal.SIGTERM)
    case.engine.wait(cid)
    with pytest.raises(WrongState):
        case.engine.exec(cid, process, ExecOptions())
    case.engine.delete(cid)


def test_requests_beyond_the_oci_verbs(case: Case) -> None:
    cid = f"req-{uuid.uuid4().hex[:6]}"
    case.create(cid)
    case.engine.start(cid)
    try:
        if case.kind in ("native", "vm"):  # no runtime of their own that holds evidence
            with pytest.raises(Unsupported):
                case.engine.attest(cid, b"\0" * 32)
        elif case.kind == "enclave-wasm":
            evidence: dict[str, Any] = case.engine.attest(cid, b"\x01" * 32)
            assert evidence["tee"] == "wasm"
        else:  # the skeleton PAL is v2: no local reports
            with pytest.raises(ClaveError):
                case.engine.attest(cid, b"\0" * 32)
    finally:
        case.engine.delete(cid, force=True)


def test_errors_are_the_same_classes(case: Case) -> None:
    with pytest.raises(NotFound):
        case.engine.start("nosuch")
    with pytest.raises(NotFound):
        case.engine.kill("nosuch", signal.SIGTERM)
    with pytest.raises(InvalidArgument):
        case.engine.state("bad/id")
    cid = f"err-{uuid.uuid4().hex[:6]}"
    case.create(cid)
    with pytest.raises(AlreadyExists):
        case.create(cid)
    case.engine.start(cid)
    with pytest.raises(WrongState):
        case.engine.delete(cid)  # running: only --force removes it
    case.engine.delete(cid, force=True)
    broken = case.bundle / "config.json"
    broken.write_text("{")
    with pytest.raises(InvalidArgument):
        case.create(f"bad-{uuid.uuid4().hex[:6]}")
    assert os.listdir(case.root) == []


def test_delete_force_after_a_crash_at_any_step(case: Case) -> None:
    """A state dir left as a killed create leaves it (pid 0, 'creating'): destroy through the contract cleans."""
    cid = f"crash-{uuid.uuid4().hex[:6]}"
    case.create(cid)
    state_file = case.root / cid / "state.json"
    doc = json.loads(state_file.read_text())
    doc["pid"] = 0  # as if create died before recording the init
    state_file.write_text(json.dumps(doc))
    assert case.status(cid) == "creating"
    vm_dir = doc.get("handler_state", {}).get("vm_dir", "")
    case.engine.delete(cid, force=True)
    assert not (case.root / cid).exists()
    if case.kind == "vm":  # its QEMU (and the keeper that lost it) are gone too, with the VM's directory
        deadline = time.monotonic() + 30
        while _processes_naming(vm_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_naming(vm_dir) == [] and not os.path.exists(vm_dir)


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found
