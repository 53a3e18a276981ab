"""linux.resources and cgroupsPath as the kernel sees them; a resource the host cannot apply is an error
naming it, with nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Bundle, Clave

MIB = 1024 * 1024


def cgroup_mounts() -> dict[str, str]:
    """v1 controller (or "" for cgroup2) -> mount point."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ")
            fstype, _, options = post.split()
            if fstype == "cgroup2":
                mounts[""] = pre.split()[4]
            elif fstype == "cgroup":
                for opt in options.split(","):
                    mounts.setdefault(opt, pre.split()[4])
    return mounts


V2_ONLY = "" in cgroup_mounts() and "memory" not in cgroup_mounts()


def cgroup_dir(pid: int, controller: str) -> str:
    """The directory of ``pid``'s cgroup for a controller (its cgroup2 dir on a v2 host)."""
    mounts = cgroup_mounts()
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if V2_ONLY and names == "":
                return mounts[""] + path
            if controller in names.split(","):
                return mounts[controller] + path
    raise AssertionError(f"{controller} not in /proc/{pid}/cgroup")


def read(pid: int, controller: str, v1_file: str, v2_file: str) -> str:
    with open(os.path.join(cgroup_dir(pid, controller), v2_file if V2_ONLY else v1_file)) as f:
        return f.read().strip()


def test_resources_applied(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["resources"].update({
        "memory": {"limit": 64 * MIB},
        "pids": {"limit": 50},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
    })
    bundle.args("sleep", "60")
    pid = clave.create(clave.id())
    assert int(read(pid, "memory", "memory.limit_in_bytes", "memory.max")) == 64 * MIB
    assert read(pid, "pids", "pids.max", "pids.max") == "50"
    if V2_ONLY:
        assert read(pid, "cpu", "", "cpu.max") == "50000 100000"
    else:
        assert read(pid, "cpu", "cpu.shares", "") == "512"
        assert read(pid, "cpu", "cpu.cfs_quota_us", "") == "50000"
        assert read(pid, "cpu", "cpu.cfs_period_us", "") == "100000"
    assert read(pid, "cpuset", "cpuset.cpus", "cpuset.cpus") == "0"
    assert read(pid, "cpuset", "cpuset.mems", "cpuset.mems") == "0"


def test_limits_visible_and_enforced_inside(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["resources"]["pids"] = {"limit": 5}
    path = "/sys/fs/cgroup/pids.max" if V2_ONLY else "/sys/fs/cgroup/pids/pids.max"
    # sh and four sleeps fill the five slots: the fifth sleep cannot be forked and the shell gives up.
    bundle.sh(f"cat {path}; sleep 2 & sleep 2 & sleep 2 & sleep 2 & sleep 2 & echo unreachable")
    result = clave.run()
    assert result.stdout == b"5\n"
    assert b"can't fork" in result.stderr and result.returncode == 2


def test_cgroups_path_absolute(clave: Clave, bundle: Bundle) -> None:
    path = f"/{clave.prefix}-parent/{clave.prefix}-inner"
    bundle.linux["cgroupsPath"] = path
    bundle.linux["resources"]["memory"] = {"limit": 32 * MIB}
    bundle.args("sleep", "60")
    cid = clave.id()
    pid = clave.create(cid)
    memory = cgroup_dir(pid, "memory")
    assert memory.endswith(path)
    assert int(read(pid, "memory", "memory.limit_in_bytes", "memory.max")) == 32 * MIB
    clave("delete", "--force", cid)
    assert not os.path.exists(memory)
    # The parent stays, as with runc (other containers may share it): the test removes its own.
    for mount in set(cgroup_mounts().values()):
        if os.path.isdir(f"{mount}/{clave.prefix}-parent"):
            os.rmdir(f"{mount}/{clave.prefix}-parent")


def test_cgroups_path_relative(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["cgroupsPath"] = f"{clave.prefix}-rel"
    bundle.args("sleep", "60")
    pid = clave.create(clave.id())
    with open("/proc/self/cgroup") as f:
        own = {line.split(":")[1]: line.strip().split(":", 2)[2] for line in f}
    key = "" if V2_ONLY else "pids"
    with open(f"/proc/{pid}/cgroup") as f:
        theirs = {line.split(":")[1]: line.strip().split(":", 2)[2] for line in f}
    assert theirs[key].endswith(f"/{clave.prefix}-rel")
    assert theirs[key].startswith(own[key].rstrip("/") if not V2_ONLY else "/")


def _set(section: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(resources: dict[str, Any]) -> None:
        resources[section] = value

    return edit


UNAPPLIABLE = {
    "network.classID": (_set("network", {"classID": 0x100001}), "classID"),
    "hugepageLimits": (_set("hugepageLimits", [{"pageSize": "2MB", "limit": 2 * MIB}]), "huge"),
    "blockIO.leafWeight": (_set("blockIO", {"leafWeight": 500}), "leafWeight"),
}


@pytest.mark.parametrize("case", sorted(UNAPPLIABLE))
def test_unappliable_resource_is_an_error(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None],
                                          case: str) -> None:
    edit, name = UNAPPLIABLE[case]
    edit(bundle.linux["resources"])
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert name in message, message
    assert_clean()


def test_block_io_throttle(clave: Clave, bundle: Bundle) -> None:
    disks = sorted(d for d in os.listdir("/sys/block") if not d.startswith(("loop", "zram", "ram")))
    if not disks:
        pytest.skip("no block device to throttle")
    with open(f"/sys/block/{disks[0]}/dev") as f:
        major, minor = (int(x) for x in f.read().split(":"))
    bundle.linux["resources"]["blockIO"] = {
        "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1048576}],
        "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 100}],
    }
    bundle.args("sleep", "60")
    pid = clave.create(clave.id())
    if V2_ONLY:
        line = read(pid, "io", "", "io.max")
        assert f"{major}:{minor} rbps=1048576" in line and "wiops=100" in line
    else:
        assert read(pid, "blkio", "blkio.throttle.read_bps_device", "") == f"{major}:{minor} 1048576"
        assert read(pid, "blkio", "blkio.throttle.write_iops_device", "") == f"{major}:{minor} 100"


def _children() -> set[int]:
    """Our child processes, zombies included (this package's tests are a subreaper, as a shim is)."""
    me = str(os.getpid())
    out = set()
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if name.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == me:
                    out.add(int(name))
        except OSError:
            continue
    return out


def test_create_reaps_its_grace_period_helper(clave: Clave, bundle: Bundle) -> None:
    """`create` forks a helper that starts the kernel's cgroup-migration grace period early
    (clave.linux.cgroups.start_migration_grace_period); it collects it before exiting, so the only process
    it leaves to its caller is the container's init (no zombie for the shim's reaper)."""
    bundle.args("sleep", "60")
    before = _children()
    pid = clave.create(clave.id())
    assert _children() - before == {pid}


def test_grace_period_helper_leaves_the_caller_where_it_is() -> None:
    from clave.linux.cgroups.common import own_cgroups, start_migration_grace_period

    before = own_cgroups()
    helper = start_migration_grace_period()
    assert helper > 0
    _, status = os.waitpid(helper, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert own_cgroups() == before
