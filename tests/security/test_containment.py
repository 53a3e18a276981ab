"""Containment of a default container (`clave spec`'s config: runc's capabilities, Docker's seccomp profile,
masked and read-only paths, namespaces), and the confinement settings of config.json observed from inside.

Every container runs through the real CLI; the runner fixture asserts nothing of it stays on the host."""

from __future__ import annotations

import os
import resource
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from security.harness import Runner

DEFAULT_CAPS = (1 << 5) | (1 << 10) | (1 << 29)  # CAP_KILL, CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE
CAP_SYS_ADMIN = 21
SIGSYS = 31


def status_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def run_ok(runner: Runner, name: str, config: dict[str, Any]) -> str:
    result = runner.run(name, config)
    assert result.returncode == 0, f"{config['process']['args']} exited {result.returncode}: {result.stderr}"
    return result.stdout


# ------------------------------------------------------------------ what a default container cannot do


def test_sees_only_its_own_pids(runner: Runner) -> None:
    out = run_ok(runner, "pids", runner.config("sh", "-c", "ls /proc; echo ---; ps -o pid,comm"))
    listing, ps = out.split("---")
    pids = sorted(int(name) for name in listing.split() if name.isdigit())
    assert pids[0] == 1 and len(pids) <= 3, f"container sees pids {pids}"
    assert os.getpid() not in pids
    ps_pids = [int(line.split()[0]) for line in ps.strip().splitlines()[1:]]
    assert ps_pids and max(ps_pids) <= 5, ps


def test_cannot_mount(runner: Runner) -> None:
    out = run_ok(runner, "mount", runner.config("sh", "-c", "probe mount; mount -t tmpfs none /mnt || echo REFUSED"))
    assert out.split() == ["EPERM", "REFUSED"], out


@pytest.mark.parametrize("call", ["init_module", "finit_module"])
def test_cannot_load_kernel_modules(runner: Runner, call: str) -> None:
    result = runner.run(call.replace("_", "-"), runner.config("probe", call))
    assert (result.returncode, result.stdout.strip()) == (1, "EPERM")


def test_kcore_and_firmware_are_masked(runner: Runner) -> None:
    # Some kernels have no /proc/kcore: then there is nothing to read either way.
    script = ("cat /proc/kcore 2>/dev/null | wc -c; ls -A /sys/firmware | wc -l;"
              " echo x > /proc/sys/kernel/domainname || echo RO")
    out = run_ok(runner, "masked", runner.config("sh", "-c", script))
    kcore_bytes, firmware_entries, proc_sys = out.split()
    assert (kcore_bytes, firmware_entries, proc_sys) == ("0", "0", "RO")
    if os.path.exists("/proc/kcore"):
        assert run_ok(runner, "kcore", runner.config("ls", "-l", "/proc/kcore")).split()[4] == "0"


def test_cannot_change_the_host_hostname(runner: Runner) -> None:
    host = socket.gethostname()
    result = runner.run("uts-default", runner.config("probe", "sethostname", "evil-host"))
    assert (result.returncode, result.stdout.strip()) == (1, "EPERM")
    # Even with CAP_SYS_ADMIN (and no seccomp, which refuses sethostname without it) the change stays in the
    # container's UTS namespace.
    config = runner.config("sh", "-c", "hostname evil-host && hostname")
    for caps in config["process"]["capabilities"].values():
        caps.append("CAP_SYS_ADMIN")
    del config["linux"]["seccomp"]
    assert run_ok(runner, "uts-admin", config).strip() == "evil-host"
    assert socket.gethostname() == host


def test_cannot_ptrace_a_host_process(runner: Runner) -> None:
    host_pid = os.getpid()  # this test process: never a pid inside a 2-process namespace
    script = f"probe ptrace {host_pid}; cat /proc/1/comm; test -e /proc/{host_pid} || echo HIDDEN"
    out = run_ok(runner, "ptrace", runner.config("sh", "-c", script)).split()
    assert out == ["ESRCH", "sh", "HIDDEN"], out


def test_cannot_regain_dropped_capabilities(runner: Runner) -> None:
    result = runner.run("capset", runner.config("probe", "capset"))
    assert (result.returncode, result.stdout.strip()) == (1, "EPERM")
    # A setuid-root binary run by an unprivileged user, without no_new_privs: the kernel grants at most the
    # bounding set, which the container shrank to the default capabilities.
    config = runner.config("probe-suid", "caps")
    config["process"]["user"] = {"uid": 1000, "gid": 1000}
    config["process"]["noNewPrivileges"] = False
    fields = status_fields(run_ok(runner, "setuid", config))
    assert fields["Uid"].split()[:2] == ["1000", "0"], fields  # the setuid bit did apply
    assert int(fields["CapBnd"], 16) == DEFAULT_CAPS
    assert int(fields["CapEff"], 16) & ~DEFAULT_CAPS == 0
    assert not int(fields["CapEff"], 16) & (1 << CAP_SYS_ADMIN)
    # With no_new_privs (the default) the setuid bit grants nothing at all.
    config["process"]["noNewPrivileges"] = True
    fields = status_fields(run_ok(runner, "setuid-nnp", config))
    assert fields["Uid"].split()[:2] == ["1000", "1000"] and int(fields["CapEff"], 16) == 0, fields


def test_symlinked_mount_destination_stays_in_the_rootfs(runner: Runner, tmp_path: Path) -> None:
    rootfs = tmp_path / "private-rootfs"
    shutil.copytree(runner.rootfs, rootfs, symlinks=True)
    host_target = Path("/tmp") / f"clave-escape-{tmp_path.name}"
    (rootfs / "etc/evil").symlink_to(f"/../../../..{host_target}")
    source = tmp_path / "source"
    source.mkdir()
    (source / "marker").write_text("from-the-bind-source\n")
    config = runner.config("cat", "/etc/evil/marker")
    config["root"]["path"] = str(rootfs)
    config["mounts"].append({"destination": "/etc/evil", "type": "bind", "source": str(source),
                             "options": ["rbind", "ro"]})
    try:
        assert run_ok(runner, "symlink", config) == "from-the-bind-source\n"
        assert not host_target.exists(), "the mount destination was created outside the rootfs"
        assert (rootfs / str(host_target).lstrip("/")).is_dir()
    finally:
        if host_target.is_dir():
            host_target.rmdir()


# ------------------------------------------------------------------ confinement settings, observed inside


def seccomp_profile(action: str, **extra: Any) -> dict[str, Any]:
    """Allow everything but getppid (which neither the init nor the static probe calls)."""
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["getppid"], "action": action, **extra}]}


@pytest.fixture
def getppid_nr() -> int:
    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers below are x86_64's")
    return 110


def test_seccomp_errno_action_returns_errno_ret(runner: Runner, getppid_nr: int) -> None:
    config = runner.config("probe", "syscall", str(getppid_nr))
    config["linux"]["seccomp"] = seccomp_profile("SCMP_ACT_ERRNO", errnoRet=95)
    result = runner.run("errno", config)
    assert (result.returncode, result.stdout.strip()) == (1, "EOPNOTSUPP"), result.stderr


def test_seccomp_kill_action_kills_with_sigsys(runner: Runner, getppid_nr: int) -> None:
    config = runner.config("probe", "syscall", str(getppid_nr))
    config["linux"]["seccomp"] = seccomp_profile("SCMP_ACT_KILL")
    result = runner.run("kill", config)
    assert result.returncode == 128 + SIGSYS, (result.returncode, result.stdout, result.stderr)


def test_default_seccomp_profile_is_loaded_with_no_new_privs(runner: Runner) -> None:
    fields = status_fields(run_ok(runner, "nnp", runner.config("cat", "/proc/self/status")))
    assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")
    assert int(fields["CapEff"], 16) == DEFAULT_CAPS
    config = runner.config("cat", "/proc/self/status")
    config["process"]["noNewPrivileges"] = False
    assert status_fields(run_ok(runner, "no-nnp", config))["NoNewPrivs"] == "0"


def test_rlimits_are_applied(runner: Runner) -> None:
    config = runner.config("sh", "-c", "ulimit -n; ulimit -Hn")
    config["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]
    assert run_ok(runner, "rlimit", config).split() == ["123", "456"]


def test_rlimit_above_the_host_limit_fails_clearly(runner: Runner) -> None:
    # Above fs.nr_open no process may raise RLIMIT_NOFILE, CAP_SYS_RESOURCE or not.
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    hard = max(nr_open, resource.getrlimit(resource.RLIMIT_NOFILE)[1]) + 1
    config = runner.config("true")
    config["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard}]
    # create itself fails (as with runc), not a later start.
    error = runner.create("rlimit-high", runner.bundle("rlimit-high", config))
    assert "RLIMIT_NOFILE" in error and "\n" not in error, error
    assert runner.leftovers("rlimit-high") == []


def test_oom_score_adj(runner: Runner) -> None:
    config = runner.config("cat", "/proc/self/oom_score_adj")
    config["process"]["oomScoreAdj"] = 500
    assert run_ok(runner, "oom", config).strip() == "500"


def test_readonly_and_masked_paths(runner: Runner) -> None:
    config = runner.config("sh", "-c", "touch /ro/x 2>/dev/null || echo RO; touch /rw/x && echo RW;"
                                       " wc -c < /etc/passwd; ls -A /rw-masked | wc -l")
    config["mounts"] += [{"destination": d, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
                         for d in ("/ro", "/rw", "/rw-masked")]
    config["root"]["readonly"] = False
    config["linux"]["readonlyPaths"] = ["/ro"]
    config["linux"]["maskedPaths"] = ["/etc/passwd", "/rw-masked"]
    try:
        assert run_ok(runner, "paths", config).split() == ["RO", "RW", "0", "0"]
    finally:
        for d in ("ro", "rw", "rw-masked"):  # mount targets the runtime made in the shared rootfs
            if (runner.rootfs / d).is_dir():
                (runner.rootfs / d).rmdir()


@pytest.mark.parametrize("where,key,lsm_dir", [
    ("process", "apparmorProfile", "/sys/kernel/security/apparmor"),
    ("process", "selinuxLabel", "/sys/fs/selinux"),
])  # linux.mountLabel without SELinux is ignored with a warning, as crun does (tests/runtime/test_spec_clauses.py)
def test_lsm_fields_are_refused_clearly(runner: Runner, where: str, key: str, lsm_dir: str) -> None:
    if os.path.isdir(lsm_dir):
        pytest.skip(f"this host has the LSM ({lsm_dir})")
    config = runner.config("true")
    config[where][key] = "system_u:system_r:container_t:s0" if "selinux" in lsm_dir else "docker-default"
    result = runner.run("lsm", config)
    assert result.returncode != 0
    assert ("AppArmor" if "apparmor" in lsm_dir else "SELinux") in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert runner.leftovers("lsm") == []


def test_personality_linux32(runner: Runner) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("LINUX32 on x86_64 reports i686")
    config = runner.config("uname", "-m")
    config["linux"]["personality"] = {"domain": "LINUX32"}
    assert run_ok(runner, "personality", config).strip() == "i686"
