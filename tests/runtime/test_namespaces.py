"""config-linux.md namespaces: each type created new, absent types shared with the host, joining by path,
user namespaces with id mappings; hostname and domainname; sysctl."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Bundle, Clave

PROC_NAMES = {"pid": "pid", "network": "net", "ipc": "ipc", "uts": "uts", "mount": "mnt", "cgroup": "cgroup"}


def host_ns(name: str, pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def ns_report(clave: Clave, bundle: Bundle) -> dict[str, str]:
    script = "; ".join(f"echo {n}=$(readlink /proc/self/ns/{n})" for n in PROC_NAMES.values())
    bundle.sh(script)
    return dict(line.split("=", 1) for line in clave.output().split())


def test_every_namespace_new(clave: Clave, bundle: Bundle) -> None:
    inside = ns_report(clave, bundle)
    for name in PROC_NAMES.values():
        assert inside[name] != host_ns(name), f"{name} namespace shared with the host"


def test_time_namespace(clave: Clave, bundle: Bundle) -> None:
    if not os.path.exists("/proc/self/ns/time"):
        pytest.skip("kernel without time namespaces")
    bundle.linux["namespaces"].append({"type": "time"})
    bundle.args("readlink", "/proc/self/ns/time")
    assert clave.output().strip() != host_ns("time")


def test_absent_namespaces_are_shared(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["namespaces"] = [{"type": "mount"}]
    del bundle.config["hostname"]
    bundle.linux.pop("sysctl", None)
    inside = ns_report(clave, bundle)
    assert inside["mnt"] != host_ns("mnt")
    for name in ("pid", "net", "ipc", "uts", "cgroup"):
        assert inside[name] == host_ns(name), f"{name} namespace was not shared"


def test_pid_namespace_init_is_pid_1(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("echo $$; ls /proc | grep '^[0-9]'")
    pid, *pids = clave.output().split()
    assert pid == "1"
    assert "1" in pids and all(int(p) < 10 for p in pids), pids  # only the container's own processes


def test_network_namespace_has_only_lo(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("ls /sys/class/net; tail -n +3 /proc/net/dev | cut -d: -f1")
    assert clave.output().split() == ["lo", "lo"]


def test_uts_hostname_and_domainname(clave: Clave, bundle: Bundle) -> None:
    bundle.config["hostname"] = "box-one"
    bundle.config["domainname"] = "example.test"
    bundle.sh("hostname; cat /proc/sys/kernel/domainname")
    assert clave.output().split() == ["box-one", "example.test"]
    assert os.uname().nodename != "box-one"


def test_user_namespace_with_mappings(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["namespaces"].append({"type": "user"})
    bundle.config["mounts"] = [m for m in bundle.config["mounts"] if m["destination"] != "/out"]
    bundle.linux["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    bundle.linux["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    bundle.sh("cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; "
              "stat -c %u /bin/busybox; sleep 60")
    cid = clave.id()
    pid = clave.create(cid)
    status = os.stat(f"/proc/{pid}")
    assert (status.st_uid, status.st_gid) == (100000, 200000)
    clave("start", cid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and clave.stdout(cid).count("\n") < 5:
        time.sleep(0.02)
    lines = [line.split() for line in clave.stdout(cid).splitlines()]
    assert lines[0] == ["0", "100000", "65536"]
    assert lines[1] == ["0", "200000", "65536"]
    assert lines[2:4] == [["0"], ["0"]]
    assert lines[-1] == ["65534"]  # host root's files are unmapped inside: nobody
    assert host_ns("user", pid) != host_ns("user")


@pytest.fixture
def ns_holder() -> object:
    proc = subprocess.Popen(["unshare", "--net", "--uts", "sh", "-c", "hostname joined-ns; echo; exec sleep 60"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()  # the hostname is set
    yield proc
    proc.kill()
    proc.wait()


def test_join_namespaces_by_path(clave: Clave, bundle: Bundle, ns_holder: subprocess.Popen[bytes]) -> None:
    holder = ns_holder.pid
    bundle.linux["namespaces"] = [
        {"type": "mount"}, {"type": "pid"},
        {"type": "network", "path": f"/proc/{holder}/ns/net"}, {"type": "uts", "path": f"/proc/{holder}/ns/uts"},
    ]
    del bundle.config["hostname"]
    bundle.sh("readlink /proc/self/ns/net; readlink /proc/self/ns/uts; hostname")
    net, uts, hostname = clave.output().split()
    assert net == host_ns("net", holder) != host_ns("net")
    assert uts == host_ns("uts", holder)
    assert hostname == "joined-ns"


def test_join_another_containers_network(clave: Clave, bundle: Bundle) -> None:
    bundle.args("sleep", "60")
    first = clave.id("first")
    first_pid = clave.create(first)
    bundle.linux["namespaces"] = [n for n in bundle.linux["namespaces"] if n["type"] != "network"]
    bundle.linux["namespaces"].append({"type": "network", "path": f"/proc/{first_pid}/ns/net"})
    bundle.sh("readlink /proc/self/ns/net")
    assert clave.output(cid=clave.id("second")).strip() == host_ns("net", first_pid)


def test_join_missing_namespace_path(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    bundle.linux["namespaces"] = [{"type": "mount"}, {"type": "network", "path": "/proc/999999999/ns/net"}]
    del bundle.config["hostname"]
    bundle.write()
    assert "network" in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()  # type: ignore[operator]


def test_sysctl_in_private_namespaces(clave: Clave, bundle: Bundle) -> None:
    host_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    host_shmmax = Path("/proc/sys/kernel/shmmax").read_text()
    bundle.linux["sysctl"] = {"net.ipv4.ip_forward": "1", "kernel.shmmax": "4096000"}
    bundle.sh("cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmax")
    assert clave.output().split() == ["1", "4096000"]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forward
    assert Path("/proc/sys/kernel/shmmax").read_text() == host_shmmax


@pytest.mark.parametrize(("key", "value"), [("net.ipv4.ip_forward", "not-a-number"), ("net.no.such.key", "1")])
def test_sysctl_write_failure(clave: Clave, bundle: Bundle, assert_clean: object, key: str, value: str) -> None:
    bundle.linux["sysctl"] = {key: value}
    bundle.write()
    assert key in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()  # type: ignore[operator]


@pytest.mark.parametrize(("key", "namespaces"), [
    ("kernel.panic", None),  # not namespaced at all
    ("net.ipv4.ip_forward", ["mount", "pid"]),  # namespaced, but the container has no network namespace
    ("kernel.shmmax", ["mount", "network"]),
])
def test_sysctl_refused(clave: Clave, bundle: Bundle, assert_clean: object, key: str,
                        namespaces: list[str] | None) -> None:
    bundle.linux["sysctl"] = {key: "1"}
    if namespaces:
        bundle.linux["namespaces"] = [{"type": t} for t in namespaces]
        del bundle.config["hostname"]
    bundle.write()
    assert key in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()  # type: ignore[operator]


def test_user_namespace_rootfs_out_of_reach(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    """The mapped root cannot reach a rootfs under a 0700 directory: a clear error, nothing left."""
    rootfs = bundle.private_rootfs()
    bundle.path.chmod(0o700)
    bundle.linux["namespaces"].append({"type": "user"})
    bundle.config["mounts"] = [m for m in bundle.config["mounts"] if m["destination"] != "/out"]
    bundle.linux["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    bundle.linux["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert message.endswith("Permission denied") and str(rootfs) in message and "Errno" not in message
    assert_clean()  # type: ignore[operator]


def test_join_user_namespace_by_path(clave: Clave, bundle: Bundle) -> None:
    """A second container joins the first one's user and network namespaces (no mappings of its own)."""
    userns = [n for n in bundle.linux["namespaces"] if n["type"] != "network"]
    bundle.config["mounts"] = [m for m in bundle.config["mounts"] if m["destination"] != "/out"]
    first_config = bundle.clone_config()
    first_config["linux"]["namespaces"] = userns + [{"type": "user"}, {"type": "network"}]
    first_config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    first_config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    first_config["process"]["args"] = ["sleep", "60"]
    saved = bundle.config
    bundle.config = first_config
    first_pid = clave.create(clave.id("first"))
    bundle.config = saved
    bundle.linux["namespaces"] = userns + [{"type": "user", "path": f"/proc/{first_pid}/ns/user"},
                                           {"type": "network", "path": f"/proc/{first_pid}/ns/net"}]
    bundle.sh("readlink /proc/self/ns/user /proc/self/ns/net 2>/dev/null || "
              "{ readlink /proc/self/ns/user; readlink /proc/self/ns/net; }; cat /proc/self/uid_map")
    lines = clave.output(cid=clave.id("second")).splitlines()
    assert lines[:2] == [host_ns("user", first_pid), host_ns("net", first_pid)]
    assert lines[2].split() == ["0", "100000", "65536"]


def test_id_maps_of_a_bind_mounted_user_namespace(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    from clave.linux.namespaces import id_maps_of

    bundle.linux["namespaces"].append({"type": "user"})
    bundle.config["mounts"] = [m for m in bundle.config["mounts"] if m["destination"] != "/out"]
    bundle.linux["uidMappings"] = [{"containerID": 0, "hostID": 300000, "size": 1000}]
    bundle.linux["gidMappings"] = [{"containerID": 0, "hostID": 400000, "size": 1000}]
    bundle.args("sleep", "60")
    pid = clave.create(clave.id())
    pinned = tmp_path / "userns"
    pinned.touch()
    subprocess.run(["mount", "--bind", f"/proc/{pid}/ns/user", str(pinned)], check=True)
    try:
        uid_maps, gid_maps = id_maps_of(str(pinned))
    finally:
        subprocess.run(["umount", str(pinned)], check=True)
    assert uid_maps == [{"containerID": 0, "hostID": 300000, "size": 1000}]
    assert gid_maps == [{"containerID": 0, "hostID": 400000, "size": 1000}]
