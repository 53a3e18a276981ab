"""VM templates (clave.vm.template): one template per guest shape, clones restored from it, a fresh identity per
clone, corrupt or stale templates rebuilt, a failed restore falling back to a boot. Real QEMU; the template of
this module's shape is built once and shared (a different memory size from the other modules' VMs, so this
module owns its template)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from clave.vm import template as tmpl
from clave.vm.client import AgentClient, blk_storage
from clave.vm.guest import Guest
from clave.vm.qemu import Disk, Vm, VmConfig
from tests.vm.conftest import MOUNTS, oci_config, qemu_pids_for, rootfs_image, short_dir

MEMORY = 192  # this module's shape


def run(agent: AgentClient, cid: str, args: list[str], serial: str, guest_uts: bool = False) -> tuple[int, str]:
    config = oci_config(args, serial)
    if guest_uts:  # the guest's own hostname, not the config's
        config.pop("hostname", None)
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "uts"]
    agent.create_container(cid, config, [blk_storage(serial, f"{MOUNTS}/{serial}")])
    try:
        io = agent.attach_io(cid)
        agent.start_container(cid)
        status = agent.wait_process(cid, timeout=60)
        io.join(10)
        return status, io.stdout.decode()
    finally:
        agent.remove_container(cid)


@pytest.fixture(scope="module")
def work() -> Iterator[str]:
    path = short_dir("vtp-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def image(work: str) -> str:
    return rootfs_image(os.path.join(work, "rootfs.img"))


def make(guest: Guest, work: str, name: str, image: str | None = None, **kw: object) -> Vm:
    disks = []
    if image is not None:
        copy = os.path.join(work, f"{name}.img")
        shutil.copyfile(image, copy)
        disks.append(Disk(copy, f"rootfs-{name}"))
    return Vm.create(VmConfig(os.path.join(work, name), guest, memory_mib=MEMORY, disks=disks, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clones(guest: Guest, work: str, image: str) -> Iterator[list[Vm]]:
    """Two clones of this module's template, each with its own rootfs disk in a slot."""
    vms: list[Vm] = []
    try:
        for name in ("a", "b"):
            vm = make(guest, work, name, image)
            vms.append(vm)
            vm.start()
        yield vms
    finally:
        for vm in vms:
            state = vm.state_dir
            vm.destroy()
            assert not os.path.exists(state) and qemu_pids_for(state) == []


def test_clones_restore_from_one_template_and_see_their_disks(clones: list[Vm]) -> None:
    a, b = clones
    assert a.template_key and a.template_key == b.template_key
    assert not b.template_built  # the first create built it (or an earlier run did); the second cloned it
    assert b.timings.agent_ready < 5.0  # a boot under TCG takes seconds; a clone's agent answers at once
    for vm, name in ((a, "a"), (b, "b")):
        status, out = run(vm.agent(), f"ls-{name}", ["sh", "-c", "ls /bin/busybox && echo ok"], f"rootfs-{name}")
        assert (status, out.split()[-1]) == (0, "ok")
    meta = tmpl.Template(a.template_key)
    assert meta.problem() == ""
    assert os.path.exists(meta.memory) and meta.memory.startswith(tmpl.MEMORY_DIR)


def test_each_clone_has_its_own_identity(clones: list[Vm]) -> None:
    """RNG reseeded from the host, boot_id drawn after restore, the clock set; hostname and machine id are
    the pod's (CreateSandbox)."""
    seen = []
    for vm, name in zip(clones, ("a", "b"), strict=True):
        agent = vm.agent()
        agent.create_sandbox(f"pod-{name}", hostname=f"pod-{name}", machine_id=f"{'0' if name == 'a' else '1'}" * 32)
        script = ("cat /proc/sys/kernel/random/boot_id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
                  " hostname; date +%s")
        status, out = run(agent, f"id-{name}", ["sh", "-c", script], f"rootfs-{name}", guest_uts=True)
        assert status == 0, out
        boot_id, random_hex, hostname, now = out.split()
        assert hostname == f"pod-{name}"
        assert abs(int(now) - time.time()) < 30  # the template's clock was set forward
        seen.append((boot_id, random_hex))
    (boot_a, rand_a), (boot_b, rand_b) = seen
    assert boot_a != boot_b
    assert rand_a != rand_b


def test_machine_id_is_the_pods(clones: list[Vm]) -> None:
    """The guest's /etc/machine-id (a link to /run/machine-id): read through a container that bind-mounts it."""
    vm = clones[0]
    agent = vm.agent()
    agent.create_sandbox("pod-a", hostname="pod-a", machine_id="0123456789abcdef0123456789abcdef")
    config = oci_config(["cat", "/host-machine-id"], "rootfs-a")
    config["mounts"].append({"destination": "/host-machine-id", "type": "bind", "source": "/etc/machine-id",
                             "options": ["rbind", "ro"]})
    agent.create_container("mid", config, [blk_storage("rootfs-a", f"{MOUNTS}/rootfs-a")])
    try:
        io = agent.attach_io("mid")
        agent.start_container("mid")
        assert agent.wait_process("mid", timeout=60) == 0
        io.join(10)
        assert io.stdout.decode().strip() == "0123456789abcdef0123456789abcdef"
    finally:
        agent.remove_container("mid")


def test_a_corrupt_template_is_rebuilt_not_restored(guest: Guest, work: str, clones: list[Vm]) -> None:
    t = tmpl.Template(clones[0].template_key)
    with open(t.state, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert t.problem() == "device state file does not match its recorded digest"
    vm = make(guest, work, "c")
    try:
        vm.start()
        assert vm.template_key == t.key and vm.template_built
        assert any("rebuilt: device state file does not match" in n for n in vm.notices)
        assert t.problem() == ""
        assert vm.agent().health() == 1
    finally:
        vm.destroy()


def test_a_stale_memory_file_is_rebuilt(guest: Guest, work: str, clones: list[Vm]) -> None:
    t = tmpl.Template(clones[0].template_key)
    replacement = t.memory + ".other"
    shutil.copyfile(t.memory, replacement)
    os.replace(replacement, t.memory)  # same bytes, another file: not the one the template saved
    assert t.problem().startswith("memory file")
    vm = make(guest, work, "d")
    try:
        vm.start()
        assert vm.template_built and t.problem() == ""
    finally:
        vm.destroy()


def test_a_clone_that_fails_to_restore_boots_instead(guest: Guest, work: str, clones: list[Vm]) -> None:
    """A state file that matches its (rewritten) metadata but is not a VM's state: QEMU refuses it, the VM
    boots, and one notice says why."""
    t = tmpl.Template(clones[0].template_key)
    with open(t.state, "wb") as f:
        f.write(b"not a migration stream")
    with open(t.meta_path) as f:
        meta = json.load(f)
    meta["state_sha256"] = tmpl._sha256(t.state)
    with open(t.meta_path, "w") as f:
        json.dump(meta, f)
    vm = make(guest, work, "e")
    try:
        vm.start()
        assert vm.template_key == ""
        assert [n for n in vm.notices if "did not restore, booting instead" in n]
        assert vm.agent().health() == 1
    finally:
        vm.destroy()
    tmpl.remove(t.key)


def test_two_creates_at_once_build_one_template(guest: Guest, work: str) -> None:
    vms = [make(guest, work, name, vcpus=1, template_slots=2) for name in ("f", "g")]
    key, _ = tmpl.key_of(vms[0].config, "tcg")
    tmpl.remove(key)
    errors: list[BaseException] = []

    def start(vm: Vm) -> None:
        try:
            vm.start()
        except BaseException as exc:  # noqa: BLE001  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(vm,)) for vm in vms]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors
        assert [vm.template_key for vm in vms] == [key, key]
        assert sorted(vm.template_built for vm in vms) == [False, True]
    finally:
        for vm in vms:
            vm.destroy()
        tmpl.remove(key)


def test_template_false_boots(guest: Guest, work: str) -> None:
    """A pod that refuses sharing (io.clave.vm.template=false) boots its own VM, silently."""
    vm = make(guest, work, "h", template=False)
    try:
        vm.start()
        assert vm.template_key == "" and vm.notices == []
        assert vm.timings.kernel_up > 0.3  # a real boot
    finally:
        vm.destroy()


def test_nics_and_too_many_disks_boot_with_a_notice(guest: Guest, work: str) -> None:
    config = VmConfig(os.path.join(work, "i"), guest, memory_mib=MEMORY, network=True)
    assert tmpl.ineligible(config) == "its NICs cannot be in a template"
    disks = [Disk(os.path.join(work, "rootfs.img"), f"d{i}") for i in range(3)]
    config = VmConfig(os.path.join(work, "i"), guest, memory_mib=MEMORY, disks=disks, template_slots=2)
    assert tmpl.ineligible(config) == "3 disks, a template has 2 slots"
