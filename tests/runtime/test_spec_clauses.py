"""runtime-spec clauses that runc 1.1.5 or crun 1.8 honour, each run with clave and with the references the same
way (same config.json, same rootfs), each test citing its clause.

crun 1.8 refuses cgroup v1 "hybrid" hosts whose cgroup2 hierarchy holds a controller (hugetlb here), so it runs in a
private mount namespace of its own where the cgroup2 mount is unmounted: what it inherits is that namespace, not
the host's. crun 1.8 also rejects ociVersion 1.2.0; its copy of the config says 1.0.2.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Bundle, Clave, reap

MIB = 1 << 20


class Reference:
    """runc or crun, run from its own bundle dir (a copy of the test's config) with its own --root and --log."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base / name
        self.root = self.base / "root"
        self.log = self.base / "log.json"
        self.bundle = self.base / "bundle"
        self.bundle.mkdir(parents=True)

    def argv(self, *args: str) -> list[str]:
        if self.name == "runc":
            return ["runc", "--root", str(self.root), "--log", str(self.log), "--log-format", "json", *args]
        script = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec crun "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "crun", "--root",
                str(self.root), "--log", str(self.log), "--log-format", "json", *args]

    def write(self, config: dict[str, Any], rootfs: Path) -> None:
        config = copy.deepcopy(config)
        config["root"]["path"] = str(rootfs)
        if self.name == "crun":
            config["ociVersion"] = "1.0.2"
        (self.bundle / "config.json").write_text(json.dumps(config))

    def run(self, config: dict[str, Any], rootfs: Path, cid: str) -> subprocess.CompletedProcess[str]:
        self.write(config, rootfs)
        try:
            return subprocess.run(self.argv("run", "--bundle", str(self.bundle), cid), capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=60)
        finally:
            self.cleanup(cid)

    def cleanup(self, cid: str) -> None:
        subprocess.run(self.argv("delete", "--force", cid), capture_output=True, timeout=30)

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def references(tmp_path: Path) -> Iterator[dict[str, Reference]]:
    found = {name: Reference(name, tmp_path / "ref") for name in ("runc", "crun") if shutil.which(name)}
    if "runc" not in found:
        pytest.skip("runc is not installed (Debian package runc)")
    yield found


def warnings(clave: Clave) -> list[str]:
    lines = [json.loads(line) for line in clave.log.read_text().splitlines()] if clave.log.exists() else []
    return [line["msg"] for line in lines if line["level"] == "warning"]


def detach_leftover_rootfs(rootfs: Path, before: str | None) -> None:
    """runc leaves the rootfs bind and every container mount in a mount namespace it inherits: remove them."""
    from clave.linux import rootfs as rfs

    rfs.detach_rootfs(str(rootfs), before)


def test_a_namespace_not_listed_is_inherited_including_mount(
    clave: Clave, bundle: Bundle, references: dict[str, Reference]
) -> None:
    """config-linux.md, Namespaces: "If a namespace type is not specified in the namespaces array, the container
    MUST inherit the runtime namespace of that type." runc and crun build the rootfs in the inherited mount
    namespace and chroot into it; so does clave, which also removes those mounts at delete (runc leaves them).
    runc refuses maskedPaths/readonlyPaths without a private mount namespace, crun and clave apply them."""
    from clave.linux import rootfs as rfs

    rootfs = bundle.private_rootfs()
    bundle.linux["namespaces"] = [n for n in bundle.linux["namespaces"] if n["type"] != "mount"]
    masked, readonly = bundle.linux.pop("maskedPaths"), bundle.linux.pop("readonlyPaths")
    bundle.sh("readlink /proc/self/ns/mnt; ls /; hostname")
    before = rfs.top_mount_id(str(rootfs))
    lines = clave.output().splitlines()
    assert lines[0] == os.readlink("/proc/self/ns/mnt")
    assert "linuxrc" in lines and "work" not in lines  # the busybox root, not the host's
    assert rfs.top_mount_id(str(rootfs)) == before, "clave left the container's mounts in the host namespace"
    listing = lines[1:]
    for name, ref in references.items():
        result = ref.run(bundle.config, rootfs, clave.id(name))
        if name == "runc":
            detach_leftover_rootfs(rootfs, before)
        assert result.returncode == 0, (name, result.stderr, ref.log_lines())
        out = result.stdout.splitlines()
        assert out[1:] == listing, name
        if name == "runc":
            assert out[0] == lines[0]  # the host's, as clave's

    bundle.linux["maskedPaths"], bundle.linux["readonlyPaths"] = masked, readonly
    bundle.sh("wc -c < /proc/timer_list; touch /proc/sys/x 2>/dev/null || echo read-only")
    assert clave.output(cid=clave.id("masked")).split() == ["0", "read-only"]  # masked, read-only
    assert rfs.top_mount_id(str(rootfs)) == before
    refused = references["runc"].run(bundle.config, rootfs, clave.id("runc-masked"))
    detach_leftover_rootfs(rootfs, before)
    assert refused.returncode != 0 and "MNT namespace" in refused.stderr
    if "crun" in references:
        result = references["crun"].run(bundle.config, rootfs, clave.id("crun-masked"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-1] == "read-only"


def test_join_an_existing_mount_namespace_by_path(
    clave: Clave, bundle: Bundle, references: dict[str, Reference]
) -> None:
    """config-linux.md, Namespaces: "path ... The runtime MUST place the container process in the namespace
    associated with that path." runc joins the mount namespace and builds the rootfs (pivot_root) inside it;
    so does clave. (crun 1.8 cannot be run here the same way: its setns into the namespace fails with EINVAL
    from inside the private mount namespace it needs on this host.)"""
    rootfs = bundle.private_rootfs()
    bundle.sh("readlink /proc/self/ns/mnt; ls /")
    seen = {}
    for name in ("clave", "runc"):
        holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
        try:
            path = f"/proc/{holder.pid}/ns/mnt"
            deadline = time.monotonic() + 5
            while os.readlink(path) == os.readlink("/proc/self/ns/mnt"):
                assert time.monotonic() < deadline, "unshare did not make a mount namespace"
                time.sleep(0.01)
            for ns in bundle.linux["namespaces"]:
                if ns["type"] == "mount":
                    ns["path"] = path
            if name == "clave":
                out = clave.output(cid=clave.id("join"))
            else:
                result = references["runc"].run(bundle.config, rootfs, clave.id("runc"))
                assert result.returncode == 0, result.stderr
                out = result.stdout
            lines = out.splitlines()
            assert lines[0] == os.readlink(path), name
            seen[name] = lines[1:]
        finally:
            holder.kill()
            holder.wait()
    assert "linuxrc" in seen["clave"]
    assert seen["clave"] == seen["runc"]


def recording(kind: str, out: Path) -> dict[str, Any]:
    return {"path": "/bin/sh", "args": ["sh", "-c", f'cat > "{out}/{kind}.json"; echo {kind} >> "{out}/order"']}


def test_failing_poststart_and_poststop_hooks_warn_and_continue(
    clave: Clave, bundle: Bundle, references: dict[str, Reference]
) -> None:
    """runtime.md, Lifecycle: "If any poststart hook fails, the runtime MUST log a warning, but the remaining
    hooks and lifecycle continue as if the hook had succeeded", and the same for poststop. crun does this;
    runc 1.1.5 runs poststart hooks during create and fails create on the first failure."""
    bundle.config["hooks"] = {
        "poststart": [{"path": "/bin/false"}, recording("poststart", bundle.out)],
        "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}, recording("poststop", bundle.out)],
    }
    bundle.args("sleep", "60")
    cid = clave.id()
    pid = clave.create(cid)
    clave("start", cid)
    assert clave.state(cid)["status"] == "running"
    clave("kill", cid, "KILL")
    reap(pid)
    clave("delete", cid)
    assert (bundle.out / "order").read_text().split() == ["poststart", "poststop"]
    assert [w.split(" (")[0] for w in warnings(clave)] == ["error running poststart hook #0",
                                                           "error running poststop hook #0"]

    if "crun" in references:
        crun = references["crun"]
        (bundle.out / "order").unlink()
        crun.write(bundle.config, bundle.rootfs)
        script = (f'umount /sys/fs/cgroup/unified 2>/dev/null; set -e; crun --root {crun.root} create --bundle '
                  f'{crun.bundle} {cid} >{crun.base}/create.out 2>&1; crun --root {crun.root} start {cid}; '
                  f'crun --root {crun.root} kill {cid} KILL; sleep 0.3; crun --root {crun.root} delete {cid}')
        for _attempt in range(2):  # the reference itself now and then dies of SIGPIPE (141) on a loaded machine
            result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                    capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
            crun.cleanup(cid)
            if result.returncode < 128:
                break
            (bundle.out / "order").unlink(missing_ok=True)
        assert result.returncode == 0, result.stderr
        assert (bundle.out / "order").read_text().split() == ["poststart", "poststop"]
    runc = references["runc"]
    runc.write(bundle.config, bundle.rootfs)
    created = subprocess.run(runc.argv("create", "--bundle", str(runc.bundle), cid), capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=60)
    runc.cleanup(cid)
    assert created.returncode != 0  # runc 1.1.5: poststart at create, and fatal


def test_rootfs_propagation_unbindable(clave: Clave, bundle: Bundle, references: dict[str, Reference]) -> None:
    """config-linux.md, Rootfs Mount Propagation: "rootfsPropagation (string, OPTIONAL) sets the rootfs's mount
    propagation. Its value is either shared, slave, private or unbindable." crun makes the root unbindable once
    it is the root; clave does the same. runc 1.1.5 fails (EINVAL binding the rootfs from an unbindable /)."""
    bundle.linux["rootfsPropagation"] = "unbindable"
    bundle.args("cat", "/proc/self/mountinfo")
    root_line = next(line for line in clave.output().splitlines() if line.split()[4] == "/")
    assert "unbindable" in root_line.split(" - ")[0].split()[6:], root_line
    if "crun" in references:
        result = references["crun"].run(bundle.config, bundle.rootfs, clave.id("crun"))
        assert result.returncode == 0, result.stderr
        crun_root = next(line for line in result.stdout.splitlines() if line.split()[4] == "/")
        assert "unbindable" in crun_root.split(" - ")[0].split()[6:]
    result = references["runc"].run(bundle.config, bundle.rootfs, clave.id("runc"))
    assert result.returncode != 0 and "invalid argument" in result.stderr


def test_prestart_and_create_runtime_hooks_get_the_runtime_state(
    clave: Clave, bundle: Bundle, references: dict[str, Reference]
) -> None:
    """config.md, POSIX-platform Hooks: "The state of the container MUST be passed to hooks over stdin so that they
    may do work appropriate to the current state of the container"; runtime.md, State: "ociVersion (string,
    REQUIRED) is version of the Open Container Initiative Runtime Specification with which the state complies",
    status "creating" while the container is being created. The fields and status are runc's; ociVersion is the
    runtime's own spec version (runc: 1.0.2-dev), not the config's."""
    bundle.config["ociVersion"] = "1.0.2"
    bundle.config.pop("annotations", None)
    bundle.config["hooks"] = {kind: [recording(kind, bundle.out)] for kind in ("prestart", "createRuntime")}
    bundle.args("true")
    cid = clave.id()
    pid = clave.create(cid)
    states = {kind: json.loads((bundle.out / f"{kind}.json").read_text()) for kind in ("prestart", "createRuntime")}
    runtime_version = clave.state(cid)["ociVersion"]
    clave("delete", "--force", cid)
    reap(pid)
    for kind, state in states.items():
        assert state == {"ociVersion": runtime_version, "id": cid, "status": "creating", "pid": pid,
                         "bundle": str(bundle.path)}, kind
    assert runtime_version != "1.0.2"  # `clave state` says the same: the runtime's version
    runc = references["runc"]
    runc.write(bundle.config, bundle.rootfs)
    result = subprocess.run(runc.argv("run", "--bundle", str(runc.bundle), cid), capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    runc.cleanup(cid)
    assert result.returncode == 0, result.stderr
    for kind in states:
        theirs = json.loads((bundle.out / f"{kind}.json").read_text())
        assert set(theirs) == set(states[kind]) and theirs["status"] == "creating", theirs
        assert theirs["ociVersion"] != "1.0.2" and theirs["bundle"] == str(runc.bundle)


def test_deprecated_kernel_memory_limits_warn_and_go_on(
    clave: Clave, bundle: Bundle, references: dict[str, Reference]
) -> None:
    """config-linux.md, Memory: "kernel (int64, OPTIONAL, NOT RECOMMENDED) sets hard limit for kernel memory usage"
    (deprecated; Linux 5.16+ ignores memory.kmem.limit_in_bytes, 6.x drops it). runc 1.1.5 warns "Kernel memory
    settings are ignored" and applies neither kernel nor kernelTCP, crun goes on; clave warns in its log for each
    and goes on with the rest applied."""
    bundle.linux["resources"]["memory"] = {"limit": 64 * MIB, "kernel": 32 * MIB, "kernelTCP": 16 * MIB}
    bundle.sh("cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory/memory.kmem.tcp.limit_in_bytes"
              " 2>/dev/null || cat /sys/fs/cgroup/memory.max")
    out = clave.output().split()
    assert out[0] == str(64 * MIB)
    assert [w.split(":")[0] for w in warnings(clave)] == ["memory.kernel", "memory.kernelTCP"]
    for name, ref in references.items():
        result = ref.run(bundle.config, bundle.rootfs, clave.id(name))
        assert result.returncode == 0, (name, result.stderr)
        if name == "runc":
            assert result.stdout.split() == out
            assert any(line["level"] == "warning" and "Kernel memory" in line["msg"] for line in ref.log_lines())
        else:
            assert result.stdout.split()[0] == str(64 * MIB), name


def test_mount_label_without_selinux_is_ignored_with_a_warning(
    clave: Clave, bundle: Bundle, references: dict[str, Reference]
) -> None:
    """config-linux.md, Mount Label: "mountLabel (string, OPTIONAL) will set the Selinux context for the mounts in
    the container." Without SELinux crun ignores it and clave does too, with a warning (runc 1.1.5 passes it as
    context= and the kernel refuses the mount). process.selinuxLabel stays refused: runc and crun refuse it."""
    if os.path.isdir("/sys/fs/selinux"):
        pytest.skip("this host has SELinux")
    bundle.linux["mountLabel"] = "system_u:object_r:container_file_t:s0:c1,c2"
    bundle.args("echo", "ok")
    assert clave.output() == "ok\n"
    assert any(w.startswith("linux.mountLabel") and "ignored" in w for w in warnings(clave))
    if "crun" in references:
        result = references["crun"].run(bundle.config, bundle.rootfs, clave.id("crun"))
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
    assert references["runc"].run(bundle.config, bundle.rootfs, clave.id("runc")).returncode != 0

    del bundle.linux["mountLabel"]
    bundle.process["selinuxLabel"] = "system_u:system_r:container_t:s0:c1,c2"
    bundle.write()
    assert "SELinux" in clave.fail("run", "--bundle", str(bundle.path), clave.id("label"))
    for name, ref in references.items():
        assert ref.run(bundle.config, bundle.rootfs, clave.id(f"{name}-label")).returncode != 0, name
