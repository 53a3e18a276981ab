"""The vm handler: a container runs in a lightweight VM with its own kernel (the Kata / runV model).

Nothing of a vm container is a host process of the container: the guest agent (clave.vm.agent) runs Clave's
Linux handler inside the guest, and the host keeps one process per guest process as its *stand-in*
(clave.vm.host): its pid is the container's pid for every caller, it carries the process's stdio as byte
streams, passes signals on and exits with the guest process's status.

One VM per container, or one per CRI pod, with the same verbs on top and whoever the caller is (`clave`,
containerd's runc shim with ``--runc-binary``, podman, Docker, containerd-shim-clave-v2):
- `create` forks the container's *keeper*, which boots the VM, creates the container in the guest, serves the
  agent to later verbs on ``vm.sock`` (clave.vm.host.VmHost) and is the init's stand-in. When the init ends it
  stops QEMU and exits with the init's status; delete removes what is left.
- A CRI pod's sandbox container boots a q35 VM with PCIe root ports; the pod's later containers join it: their
  disks are hot-plugged through the keeper (``AddDisk`` on vm.sock), and a forked stand-in serves their init.
  They leave it at delete; deleting the sandbox container stops the VM.

``state.handler_state`` keeps: ``vm_dir`` (the VM's state directory), ``layer``/``binds`` (the container's
writable rootfs layer and its disk of bound files), ``serial`` (its rootfs disk in the guest), ``vcpus`` /
``memory_mib`` / ``machine`` / ``tpm``, ``pid_start`` (the stand-in's start time), ``started``, ``paused``, and
``pod`` (the sandbox container whose VM it joined). All of it is recorded before anything is made, so delete
--force undoes a crash at any step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from clave.errors import ClaveError, InvalidArgument, NotFound, Unsupported, WrongState
from clave.faults import pause_point
from clave.handlers.base import Handler, Sandbox
from clave.handlers.linux import remove_cgroup, send_signal, wait_gone
from clave.linux.procfs import alive, start_time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from clave.engine.state import State, StateDir
    from clave.handlers.base import CreateOptions, ExecOptions
    from clave.vm.client import AgentClient
    from clave.vm.qemu import Disk, Vm

VM_RUN = "/run/clave-vm"  # VM state directories: short paths, the unix sockets inside must fit 108 bytes
MOUNTS = "/run/clave-agent/mounts"  # where the agent mounts storages in the guest
VCPUS_ANNOTATION = "io.clave.vm.vcpus"
MEMORY_ANNOTATION = "io.clave.vm.memory"  # MiB of guest RAM beyond the container's own memory limit
EXIT_FILE = "exit.json"
TPM_ANNOTATION = "io.clave.vm.tpm"  # "true": a per-VM swtpm, measured boot, `clave attest ID` (q35)
TEMPLATE_ANNOTATION = "io.clave.vm.template"  # "false": boot, never a template's clone (no shared pages)
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" or "container"
VMM_OVERHEAD_MIB = 256  # QEMU's own memory beyond guest RAM, TCG's translation cache included (bench/README.md)
POD_DISK_SLOTS = 8  # PCIe root ports a pod's VM keeps for the disks of the containers that join it
STANDIN_PREFIX = "standin."
TEST_KERNEL_ARGS = "CLAVE_TEST_VM_KERNEL_ARGS"  # extra guest kernel arguments, for tests of boot failures
SIGKILL = 9


class VmHandler(Handler):
    name = "vm"

    # -- create and destroy
    def prepare(self, state: State, notice: Callable[[str], None]) -> None:
        from clave.vm import network, qemu
        from clave.vm.guest import current_guest

        try:
            guest = current_guest()
        except ClaveError:
            raise ClaveError("no VM guest is built on this host: run 'clave vm build-guest'") from None
        vcpus, memory = vm_size(state.config)
        qemu.check_resources(vcpus, memory)
        GuestMounts(state.config)  # refuses what cannot reach a guest, before anything is made
        from clave.vm import kbs

        fetches = kbs.wanted(state.annotations)
        if fetches:
            kbs.job(state.id, state.annotations, state.config["process"])  # one line for a bad setting, now
        state.handler_state.update(guest=guest.directory, vcpus=vcpus, memory_mib=memory, kbs=fetches,
                                   tpm=fetches or state.annotations.get(TPM_ANNOTATION) == "true")
        # refuses host networking; the taps are recorded before the keeper makes them (see clave.vm.network)
        state.handler_state["network"] = network.plan(state.config)

    def create(self, state: State, sd: StateDir, opts: CreateOptions, runtime_hooks: Callable[[int], None],
               notice: Callable[[str], None]) -> int:
        from clave.vm import paths

        hs = state.handler_state
        pod = _pod_sandbox(state, sd)
        key = hashlib.sha256(f"{sd.path}\0{time.time_ns()}".encode()).hexdigest()[:16]
        hs["vm_dir"] = pod.handler_state["vm_dir"] if pod else os.path.join(VM_RUN, key)
        hs["layer"] = os.path.join(paths.VM_ROOT, "layers", f"{key}.qcow2")
        hs["binds"] = os.path.join(paths.VM_ROOT, "layers", f"{key}.binds.img")
        hs["serial"] = f"ctr-{key[:12]}"
        hs["state_dir"] = sd.path  # where exec's stand-ins are recorded
        if pod is not None:
            hs["pod"] = pod.id
            hs["tpm"] = bool(pod.handler_state.get("tpm"))  # the pod's VM decides
        elif state.annotations.get(CONTAINER_TYPE) == "sandbox":
            hs["machine"], hs["hotplug_slots"] = "q35", POD_DISK_SLOTS  # the pod's next containers join it
        if hs.get("tpm"):
            hs["machine"] = "q35"  # QEMU's TPM devices work on q35 only
        sd.save(state)  # from here on, destroy finds what to remove after a crash
        pause_point("after-state-dir")
        self._host_cgroup(state, sd, notice, pod is None)
        disks = self._disks(state, notice)
        pause_point("after-rootfs-image")
        if pod is not None:
            pid = self._join(state, sd, opts, disks)
            runtime_hooks(pid)
            return pid
        read_fd, write_fd = os.pipe()
        keeper = os.fork()
        if keeper == 0:  # the keeper: never returns
            os.close(read_fd)
            _keeper_main(state, disks, opts, write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        hs["pid_start"] = start_time(keeper)
        if not report.startswith("ok"):
            os.waitpid(keeper, 0)
            raise ClaveError(report.removeprefix("error: ") or "the VM keeper died before the container existed")
        timings = json.loads(report[2:] or "{}")
        for line in timings.pop("notices", []):
            notice(line)
        self.debug(f"vm {state.id} ({timings.pop('how', 'boot')}): " + ", ".join(
            f"{k} {v:.3f} s" for k, v in timings.items() if isinstance(v, float)))
        runtime_hooks(keeper)
        return keeper

    def _host_cgroup(self, state: State, sd: StateDir, notice: Callable[[str], None], owns_vm: bool) -> None:
        """The container's cgroup on the host (its config's cgroupsPath, as runc makes it), where its host
        processes live: the keeper and QEMU for a VM's owner, a stand-in for a container that joins a pod's VM.
        A VM's owner carries the container's limits there, memory widened by the guest's own share and QEMU's
        overhead (the container's own limit is enforced in the guest); the pod's cgroup is its parent."""
        from clave.linux import cgroups

        try:
            cgroup = cgroups.cgroup_manager(state.config.get("linux", {}).get("cgroupsPath"), state.id)
        except cgroups.CgroupError as exc:
            raise InvalidArgument(f"cgroup: {exc}") from None
        state.handler_state["cgroup_paths"] = cgroup.paths()
        sd.save(state)
        resources: dict[str, Any] = {}
        own = state.config.get("linux", {}).get("resources", {})
        if owns_vm:
            resources = {k: v for k, v in own.items() if k in ("cpu", "pids")}
            if (own.get("memory") or {}).get("limit"):
                resources["memory"] = {"limit": (state.handler_state["memory_mib"] + VMM_OVERHEAD_MIB) << 20}
        try:
            cgroup.create()
            cgroup.set(resources, warn=notice)
        except cgroups.CgroupError as exc:
            raise ClaveError(f"cgroup: {exc}") from None

    def _join(self, state: State, sd: StateDir, opts: CreateOptions, disks: list[Disk]) -> int:
        """Create the container in its pod's VM: its disks hot-plugged, a stand-in for its init."""
        from clave.vm.host import HOST

        hs = state.handler_state
        if GuestMounts(state.config).dirs:
            raise Unsupported(f"container {state.id}: a pod's later containers cannot bind host directories (only "
                              "its sandbox's VM gets virtio-fs shares, at boot)")
        added: list[str] = hs.setdefault("disks_added", [])

        def make(agent: AgentClient) -> None:
            for d in disks:
                agent.forward(HOST, "AddDisk", json.dumps({"serial": d.serial, "path": d.path, "format": d.format,
                                                           "readonly": d.readonly}).encode(), 30)
                added.append(d.serial)
                sd.save(state)
            hs["guest_created"] = True
            sd.save(state)
            _create_in_guest(agent, state, disks, shares=0)

        self._call(state, make)
        pid = _fork_standin(state, "", None, opts.stdio, opts.console_socket)
        hs["pid_start"] = start_time(pid)
        return pid

    def _disks(self, state: State, notice: Callable[[str], None]) -> list[Disk]:
        from clave.vm import rootfs
        from clave.vm.qemu import Disk

        hs = state.handler_state
        base = rootfs.base_image(state.rootfs, notice)
        hs["image_digest"] = "sha256:" + os.path.basename(base).removesuffix(".img")  # the rootfs content's digest
        # A layer even for root.readonly: the guest engine makes the mount points (a bound /etc/hosts the image
        # lacks) before it remounts the root read-only, as runc does; the base itself is never written.
        os.makedirs(os.path.dirname(hs["layer"]), mode=0o700, exist_ok=True)
        disks = [Disk(rootfs.writable_layer(base, hs["layer"]), hs["serial"], format="qcow2")]
        files = GuestMounts(state.config).files
        if files:
            disks.append(Disk(_files_image(files, hs["binds"]), _binds_serial(hs["serial"]), readonly=True))
        return disks

    def destroy(self, state: State, sd: StateDir, notice: Callable[[str], None]) -> None:
        from clave.vm import network
        from clave.vm.qemu import destroy_state_dir

        hs = state.handler_state
        if state.pid > 0 and self._alive(state):
            send_signal(state.pid, SIGKILL)
        for name in os.listdir(sd.path):
            if name.startswith(STANDIN_PREFIX):
                pid, start = _standin_record(sd.path, name)
                if pid and alive(pid, start):
                    send_signal(pid, SIGKILL)
        # The host cgroup holds every host process of the container: the keeper (also one whose pid a crashed
        # create never recorded), QEMU, swtpm, virtiofsd, stand-ins. All gone before the VM's files go: a keeper
        # that outlived its QEMU would write vm.json into the directory being removed.
        remove_cgroup(hs.get("cgroup_paths"), notice)
        if hs.get("pod"):
            self._leave_pod(state, notice)
        elif hs.get("vm_dir"):
            try:
                destroy_state_dir(hs["vm_dir"])
            except ClaveError as exc:
                notice(f"vm cleanup: {exc}")
        try:
            network.detach(hs.get("network"))  # after QEMU is gone: the taps and tc redirects
        except ClaveError as exc:
            notice(f"vm network cleanup: {exc}")
        for key in ("layer", "binds"):
            path = hs.get(key)
            if path and os.path.exists(path):
                os.unlink(path)

    def _leave_pod(self, state: State, notice: Callable[[str], None]) -> None:
        from clave.vm.host import HOST

        hs = state.handler_state

        def leave(agent: AgentClient) -> None:
            from clave.ttrpc import Code
            from clave.vm.errors import AgentError

            if hs.get("guest_created"):
                try:
                    agent.remove_container(state.id)
                except AgentError as exc:
                    if exc.code != Code.NOT_FOUND:  # never made, or removed already
                        raise
            for serial in hs.get("disks_added", []):
                agent.forward(HOST, "RemoveDisk", json.dumps({"serial": serial}).encode(), 30)

        try:
            self._call(state, leave)
        except ClaveError as exc:
            notice(f"vm cleanup: {exc} (the pod's VM keeps what it had)")

    # -- lifecycle
    def start(self, state: State, sd: StateDir) -> None:
        t0 = time.monotonic()
        self._call(state, lambda agent: agent.start_container(state.id))
        self.debug(f"vm {state.id}: container started {time.monotonic() - t0:.3f} s after start")
        state.handler_state["started"] = True
        sd.save(state)

    def status(self, state: State, sd: StateDir) -> str:
        if state.pid <= 0:
            return "creating"
        if not self._alive(state):
            return "stopped"
        hs = state.handler_state
        if hs.get("paused"):
            return "paused"
        return "running" if hs.get("started") else "created"

    def _alive(self, state: State) -> bool:
        return alive(state.pid, state.handler_state.get("pid_start", 0))

    def kill(self, state: State, sig: int, all_processes: bool = False) -> None:
        try:
            self._call(state, lambda agent: agent.signal_process(state.id, sig))
        except ClaveError:
            # A keeper ending (its init exited, or its VM is gone) drops the call: that container is not running,
            # which is what callers of kill expect to hear (containerd's "process already finished").
            wait_gone(lambda: self._alive(state), 3.0)
            if not self._alive(state):
                raise WrongState(f"container not running: {state.id}") from None
            raise

    def wait(self, state: State, pid: int) -> int:
        from clave.handlers.linux import reap_until

        return reap_until(pid)  # the stand-in is our child (or re-parented to us, the subreaper)

    # -- processes
    def exec(self, state: State, sd: StateDir, process: dict[str, Any], opts: ExecOptions) -> int:
        if process.get("terminal") and not opts.console_socket:
            raise InvalidArgument("cannot allocate tty if clave will detach without setting console socket")
        exec_id = f"exec-{time.time_ns():x}-{os.getpid()}"
        pid = _fork_standin(state, exec_id, _guest_process(process), opts.stdio, opts.console_socket)
        with open(os.path.join(sd.path, f"{STANDIN_PREFIX}{pid}"), "w") as f:
            f.write(f"{start_time(pid)} {exec_id}")
        return pid

    def signal_process(self, state: State, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)  # the stand-in passes it on (SIGKILL: the VM host kills the guest process)
        except ProcessLookupError:
            raise NotFound(f"process {pid} of container {state.id} already finished") from None

    def pids(self, state: State) -> list[int]:
        """The host processes that stand for the container's processes (the guest's pids mean nothing here)."""
        pids = [state.pid] if self._alive(state) else []
        state_dir = state.handler_state.get("state_dir", "")
        if state_dir and os.path.isdir(state_dir):
            for name in os.listdir(state_dir):
                if name.startswith(STANDIN_PREFIX):
                    pid, start = _standin_record(state_dir, name)
                    if pid and alive(pid, start):
                        pids.append(pid)
        return sorted(pids)

    # -- resources
    def pause(self, state: State) -> None:
        self._call(state, lambda agent: agent.pause_container(state.id))
        state.handler_state["paused"] = True

    def resume(self, state: State) -> None:
        self._call(state, lambda agent: agent.resume_container(state.id))
        state.handler_state["paused"] = False

    def update(self, state: State, resources: dict[str, Any], notice: Callable[[str], None]) -> None:
        self._call(state, lambda agent: agent.update_container(state.id, resources))

    def stats(self, state: State) -> dict[str, Any]:
        stats: dict[str, Any] = self._call(state, lambda agent: agent.stats_container(state.id))
        return stats

    def stats_format(self) -> str:
        return "v2"  # the guest mounts cgroup2 only

    def oom_count(self, state: State) -> int:
        if not state.handler_state.get("pod"):  # a VM of its own: the keeper recorded the count at the end
            try:
                with open(os.path.join(state.handler_state.get("vm_dir", ""), EXIT_FILE)) as f:
                    return int(json.load(f).get("oom_kills", 0))
            except (OSError, ValueError):
                pass
        try:
            return int(self._call(state, lambda agent: agent.stats_container(state.id)).get("oom_kills", 0))
        except ClaveError:
            return 0

    def request(self, state: State, sd: StateDir, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """attest: the guest's TPM quote over its measured boot and containers, bound to the verifier's nonce
        (what clave-verify --nonce checks in a quote), else to the report data; a software TPM: evidence of what
        runs, not of a hardware TEE, so marked insecure."""
        import base64

        if request.get("op") != "attest":
            raise Unsupported(f"{request.get('op')!r} requests to a vm container are not supported")
        if not state.handler_state.get("tpm"):
            raise Unsupported(f"container {state.id} has no vTPM: create it with the annotation {TPM_ANNOTATION}=true")
        binding = bytes.fromhex(request.get("nonce") or request.get("report_data", ""))
        evidence, _log = self._call(state, lambda agent: agent.quote(binding))
        return {"tee": "tpm", "insecure": True, "evidence": base64.b64encode(evidence).decode(),
                "measurement": {}, "image_digest": state.handler_state.get("image_digest", "")}

    def describe(self, state: State) -> dict[str, Any]:
        vm_dir = state.handler_state.get("vm_dir", "")
        try:
            with open(os.path.join(vm_dir, "vm.json")) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return {}
        rss = 0
        try:
            with open(f"/proc/{int(doc.get('pid') or 0)}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        timings = doc.get("timings", {})
        extra = {}
        try:
            with open(os.path.join(vm_dir, EXIT_FILE)) as f:
                if reason := json.load(f).get("reason"):
                    extra["exit_reason"] = reason
        except (OSError, ValueError):
            pass
        return {"vm": {**extra, "boot_seconds": float(timings.get("agent_ready", 0.0)), "vmm_rss_bytes": rss,
                       "restored": bool(doc.get("template")), "accel": doc.get("accel", "")}}

    def _call(self, state: State, fn: Callable[[AgentClient], Any]) -> Any:
        from clave.ttrpc import to_clave_error
        from clave.vm.client import AgentClient
        from clave.vm.errors import AgentError, VmError

        try:
            agent = AgentClient.connect(_socket(state), timeout=2.0)
        except AgentError:
            raise WrongState(f"container not running: {state.id} (its VM does not answer)") from None
        try:
            return fn(agent)
        except AgentError as exc:
            raise to_clave_error(exc.code, str(exc)) from None
        except VmError as exc:
            raise ClaveError(str(exc)) from None
        finally:
            agent.close()

    # -- the shim's side: containerd's snapshot is mounted on the host, and made into the rootfs image
    def attach_rootfs(self, bundle: str, mounts: list[dict[str, Any]]) -> str | None:
        from clave.handlers.linux import mount_rootfs

        return mount_rootfs(bundle, mounts)

    def detach_rootfs(self, attached: str | None) -> None:
        from clave.handlers.linux import unmount_rootfs

        unmount_rootfs(attached)

    def sandbox(self, sandbox_id: str) -> Sandbox:
        from clave.handlers.linux import ReaperSandbox

        return ReaperSandbox()  # stand-ins are the shim's children: it reaps them


# -- sizing and the guest's view of the config -------------------------------------------------------------------


def vm_size(config: dict[str, Any]) -> tuple[int, int]:
    """(vCPUs, MiB of guest RAM): the guest's own share (DEFAULT_MEMORY_MIB, or the io.clave.vm.memory
    annotation) plus the container's memory limit; vCPUs from its CPU quota (or io.clave.vm.vcpus)."""
    from clave.vm.qemu import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS

    annotations = config.get("annotations", {})
    resources = config.get("linux", {}).get("resources", {})
    try:
        base = int(annotations.get(MEMORY_ANNOTATION) or DEFAULT_MEMORY_MIB)
        vcpus = int(annotations.get(VCPUS_ANNOTATION) or 0)
    except ValueError:
        raise InvalidArgument(f"annotations {MEMORY_ANNOTATION} and {VCPUS_ANNOTATION} must be integers") from None
    limit = (resources.get("memory") or {}).get("limit") or 0
    memory = base + (-(-limit // (1 << 20)) if limit > 0 else 0)
    if not vcpus:
        cpu = resources.get("cpu") or {}
        quota, period = cpu.get("quota") or 0, cpu.get("period") or 100000
        vcpus = max(DEFAULT_VCPUS, -(-quota // period)) if quota > 0 else DEFAULT_VCPUS
    return vcpus, memory


class GuestMounts:
    """How the config's mounts reach the guest. A bind of a host file is carried in a read-only disk of copies
    made at create (Docker's /etc/hosts, resolv.conf, hostname); a bind of a host directory (a volume) is shared
    live over virtio-fs; a bind on /dev/shm becomes the guest's own tmpfs; other mounts the guest engine makes."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.mounts: list[dict[str, Any]] = []  # binds carry "_file" or "_share": the index resolved in guest_config
        self.files: list[str] = []  # host files, copied to the binds disk as 0, 1, ...
        self.dirs: list[str] = []  # host directories, shared as virtio-fs tags v0, v1, ...
        for mount in config.get("mounts", []):
            options = mount.get("options", [])
            if mount.get("type") != "bind" and "bind" not in options and "rbind" not in options:
                self.mounts.append(mount)
                continue
            destination, source = mount.get("destination", ""), mount.get("source", "")
            if destination == "/dev/shm":
                self.mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
            elif os.path.isfile(source):
                self.mounts.append({**mount, "_file": len(self.files)})
                self.files.append(source)
            elif os.path.isdir(source):
                self.mounts.append({**mount, "_share": len(self.dirs)})
                self.dirs.append(source)
            else:
                raise InvalidArgument(f"mount {destination}: bind source {source!r} is not a file or directory "
                                      "on this host")


def guest_config(state: State) -> dict[str, Any]:
    """The container's config as the guest engine runs it: the rootfs is the disk the agent mounts, host file
    binds come from the binds disk, directory binds from their virtio-fs shares."""
    hs = state.handler_state
    config = dict(state.config)
    config["root"] = {**config.get("root", {}), "path": f"{MOUNTS}/{hs['serial']}"}
    mounts = []
    for m in GuestMounts(state.config).mounts:
        m = dict(m)
        if "_file" in m:
            m["source"] = f"{MOUNTS}/{_binds_serial(hs['serial'])}/{m.pop('_file')}"
        elif "_share" in m:
            m["source"] = _share_mount_point(hs["serial"], m.pop("_share"))
        mounts.append(m)
    config["mounts"] = mounts
    return config


def _share_mount_point(serial: str, index: int) -> str:
    return f"{MOUNTS}/{serial}-v{index}"


def _guest_process(process: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in process.items() if not k.startswith("_")}


def _binds_serial(serial: str) -> str:
    return f"b{serial}"[:20]


def _files_image(files: list[str], path: str) -> str:
    import shutil
    import subprocess
    import tempfile

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="clave-binds-")
    try:
        for index, source in enumerate(files):
            shutil.copy2(source, os.path.join(staging, str(index)))
        done = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", staging, "-O", "^has_journal", path, "8M"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ClaveError(f"mkfs.ext4 for the bound files: {done.stderr.strip() or 'failed'}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _create_in_guest(agent: AgentClient, state: State, disks: list[Disk], shares: int) -> None:
    """Create the container in the guest from its disks (and its sandbox VM's virtio-fs shares), then, before it
    can run, measure it (a vTPM: the image's digest and the config the guest received) and fetch its key broker
    secrets (released to this guest's evidence only)."""
    from clave.proto.generated import clave_agent_v1 as pb
    from clave.vm.client import blk_storage

    serial = state.handler_state["serial"]
    storages = [blk_storage(d.serial, f"{MOUNTS}/{d.serial}", options=["ro"] if d.readonly else []) for d in disks]
    storages += [pb.Storage(driver="virtio-fs", source=f"v{i}", fstype="virtiofs",
                            mount_point=_share_mount_point(serial, i)) for i in range(shares)]
    agent.create_container(state.id, guest_config(state), storages)
    if state.handler_state.get("tpm"):
        agent.measure_container(state.id, state.handler_state["image_digest"])
    if state.handler_state.get("kbs"):
        from clave.vm import kbs

        kbs.fetch(agent, kbs.job(state.id, state.annotations, state.config["process"]))


def _fork_standin(state: State, exec_id: str, process: dict[str, Any] | None, stdio: tuple[int, int, int] | None,
                  console_socket: str | None) -> int:
    """Fork the stand-in of a guest process (clave.vm.host.stand_in); its pid once the process exists."""
    from clave.vm.client import AgentClient
    from clave.vm.host import stand_in

    console_fd = None
    if console_socket:
        from clave.linux import console

        console_fd = console.connect_socket(console_socket)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            from clave.linux.spawn import close_fds_except

            # Nothing of the caller's stays open here: not the state dir's lock, not the shim's other fds.
            close_fds_except(2, {write_fd} | ({console_fd} if console_fd is not None else set()), stdio)
            _enter_host_cgroup(state)  # a host process of the container
            agent = AgentClient.connect(_socket(state))
        except BaseException as exc:  # noqa: BLE001  # reported to the caller
            os.write(write_fd, f"error: {exc}".encode())
            os._exit(1)
        stand_in(agent, state.id, exec_id, process, console_fd, write_fd)
    os.close(write_fd)
    if console_fd is not None:
        os.close(console_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    if report != "ok":
        os.waitpid(pid, 0)
        raise ClaveError(report.removeprefix("error: ").removeprefix("agent ExecProcess: ") or "exec failed")
    return pid


def _pod_sandbox(state: State, sd: StateDir) -> State | None:
    """The CRI sandbox container whose VM this container joins (a pod's later containers), or None."""
    annotations = state.annotations
    sandbox_id = annotations.get(SANDBOX_ID)
    if annotations.get(CONTAINER_TYPE) != "container" or not sandbox_id or sandbox_id == state.id:
        return None
    from clave.engine.state import StateDir as Dir

    try:
        pod = Dir(os.path.dirname(sd.path), sandbox_id).load()
    except ClaveError:
        return None  # the sandbox is not one of ours (another runtime root): a VM of its own
    if pod.handler != "vm":
        return None
    if not alive(pod.pid, pod.handler_state.get("pid_start", 0)) or not pod.handler_state.get("hotplug_slots"):
        raise WrongState(f"container {state.id}: the VM of its pod (sandbox {sandbox_id}) is not running")
    return pod


# -- the keeper ---------------------------------------------------------------------------------------------------


def _keeper_main(state: State, disks: list[Disk], opts: CreateOptions, report_fd: int) -> None:
    """The VM's owner for `clave create` and the init's stand-in: boot, create the container in the guest, serve
    vm.sock, copy the init's stdio, and exit with its status once it ended (QEMU stopped, files left for delete)."""
    status = 255
    try:
        os.setsid()  # out of the caller's process group: its terminal's signals reach us through `kill`
        status = _keep(state, disks, opts, report_fd)
    except BaseException as exc:  # noqa: BLE001  # reported to the caller as one line
        try:
            os.write(report_fd, f"error: {exc}".encode(errors="replace"))
        except OSError:
            pass
    finally:
        os._exit(status)


def _keep(state: State, disks: list[Disk], opts: CreateOptions, report_fd: int) -> int:
    from clave.linux.spawn import adopt_stdio, close_fds_except
    from clave.vm import network
    from clave.vm.errors import VmError
    from clave.vm.guest import Guest
    from clave.vm.host import VmHost, attach
    from clave.vm.qemu import Vm, VmConfig
    from clave.vm.virtiofs import Share

    hs = state.handler_state
    _enter_host_cgroup(state)  # first: QEMU, its swtpm and virtiofsd are born in it
    dirs = GuestMounts(state.config).dirs
    if opts.stdio is not None:
        adopt_stdio(opts.stdio)
    console_fd = None
    if opts.console_socket:
        from clave.linux import console

        console_fd = console.connect_socket(opts.console_socket)
    close_fds_except(2, {report_fd} | ({console_fd} if console_fd is not None else set()))
    nics, interfaces, routes = network.attach(hs.get("network") or {})
    vm = Vm.create(VmConfig(hs["vm_dir"], Guest(hs["guest"]), vcpus=hs["vcpus"], memory_mib=hs["memory_mib"],
                            disks=disks, nics=nics, machine=hs.get("machine", "microvm"),
                            hotplug_slots=hs.get("hotplug_slots", 0),
                            shares=[Share(d, f"v{i}") for i, d in enumerate(dirs)], tpm=bool(hs.get("tpm")),
                            template=state.annotations.get(TEMPLATE_ANNOTATION, "true") != "false",
                            kernel_args=os.environ.get(TEST_KERNEL_ARGS, "")))  # tests provoke boot failures
    try:
        timings = vm.start()
        agent = vm.agent()
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        agent.create_sandbox(state.id, hostname=state.config.get("hostname", ""))
        phases["sandbox"] = time.monotonic() - t0
        network.configure_guest(agent, interfaces, routes)
        phases["network"] = time.monotonic() - t0
        _create_in_guest(agent, state, disks, shares=len(dirs))
        phases["container_created"] = time.monotonic() - t0  # measured and provisioned too, when asked
        tty = -1
        if console_fd is not None:
            from clave.vm.host import _host_tty

            tty = _host_tty(console_fd)
        io = attach(agent, state.id, "", tty)
        host = VmHost(vm)
        host.serve()
        phases["attached"] = time.monotonic() - t0
        restored = "template clone" if vm.template_key else "boot"
        report = {**timings.as_dict(), **{f"{k} (after agent ready)": v for k, v in phases.items()},
                  "notices": vm.notices, "how": restored}
        os.write(report_fd, b"ok" + json.dumps(report).encode())
        os.close(report_fd)
        report_fd = -1
    except BaseException:
        vm.destroy()
        raise
    reason = _watch_swtpm(vm)
    try:
        status = io.wait()
    except VmError:
        status = 128 + SIGKILL
    if agent.closed:
        vm.wait(5)  # the agent's connection ended: QEMU is going (its exit trails the socket's hang-up)
    if not vm.running():
        status = 128 + SIGKILL  # QEMU was killed: the container went with it
    oom = _oom_kills(agent, state.id) if vm.running() else 0
    with open(os.path.join(hs["vm_dir"], EXIT_FILE), "w") as f:
        json.dump({"status": status, "oom_kills": oom, "reason": reason[0]}, f)
    host.close()
    vm.stop()
    return status


def _watch_swtpm(vm: Vm) -> list[str]:
    """A VM whose swtpm dies has lost its TPM under the guest (its measurements, its quotes): the pod stops, the
    container with status 137, and exit.json says why. The returned list holds that reason once it happened."""
    reason = [""]
    swtpm = vm.swtpm
    if swtpm is None:
        return reason

    def watch() -> None:
        swtpm.wait()
        if vm.running() and vm.swtpm is swtpm:  # not the VM's own stop
            reason[0] = f"the vTPM (swtpm) exited with status {swtpm.returncode}: the VM was stopped"
            send_signal(vm.pid, SIGKILL)

    import threading

    threading.Thread(target=watch, name="swtpm-watch", daemon=True).start()
    return reason


def _oom_kills(agent: AgentClient, container_id: str) -> int:
    from clave.vm.errors import VmError

    try:
        return int(agent.stats_container(container_id).get("oom_kills", 0))
    except VmError:
        return 0


# -- small helpers ------------------------------------------------------------------------------------------------


def _enter_host_cgroup(state: State) -> None:
    """Move this process (the keeper, a stand-in) into the container's cgroup on the host (_host_cgroup)."""
    if state.handler_state.get("cgroup_paths"):
        from clave.linux.cgroups import CgroupManager

        CgroupManager.from_paths(state.handler_state["cgroup_paths"]).add_process(os.getpid())


def _socket(state: State) -> str:
    from clave.vm.host import SOCKET

    return os.path.join(state.handler_state.get("vm_dir", ""), SOCKET)


def _standin_record(state_dir: str, name: str) -> tuple[int, int]:
    try:
        with open(os.path.join(state_dir, name)) as f:
            start = int(f.read().split()[0])
        return int(name[len(STANDIN_PREFIX):]), start
    except (OSError, ValueError, IndexError):
        return 0, 0
