"""config.md mounts and root, config-linux.md devices, rootfsPropagation, masked/readonly paths, --no-pivot."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CLAVE, Bundle, Clave


def mountinfo_of(output: str, mountpoint: str) -> list[str]:
    """Lines of a container's /proc/self/mountinfo whose mount point is ``mountpoint``."""
    return [line for line in output.splitlines() if line.split()[4:5] == [mountpoint]]


def test_default_filesystems(clave: Clave, bundle: Bundle) -> None:
    bundle.args("cat", "/proc/self/mounts")
    mounts = {(line.split()[1], line.split()[2]) for line in clave.output().splitlines()}
    for expected in [("/proc", "proc"), ("/dev", "tmpfs"), ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"),
                     ("/dev/mqueue", "mqueue"), ("/sys", "sysfs")]:
        assert expected in mounts, expected
    assert any(point.startswith("/sys/fs/cgroup") for point, _ in mounts)


def test_cgroup_mount_shows_own_cgroup(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["resources"]["pids"] = {"limit": 77}
    bundle.sh("cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; "
              "(echo 80 > /sys/fs/cgroup/pids/pids.max) 2>/dev/null && echo writable || echo readonly")
    assert clave.output().split() == ["77", "readonly"]


@pytest.mark.parametrize("flags", [[], ["--no-pivot"]])
def test_readonly_root(clave: Clave, bundle: Bundle, flags: list[str]) -> None:
    bundle.config["root"]["readonly"] = True
    bundle.sh("touch /newfile 2>&1; echo rc=$?; touch /tmp/x 2>&1; echo rc=$?; echo ok > /dev/shm/w && cat /dev/shm/w")
    out = clave.output(*flags)
    assert out.count("Read-only file system") == 2, out
    assert "rc=1" in out and out.strip().endswith("ok")
    assert not (bundle.rootfs / "newfile").exists()


def test_bind_ro_and_rw(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    bundle.private_rootfs()  # the mount point is created in the rootfs
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("hello\n")
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    bundle.config["mounts"] += [
        {"destination": "/data", "type": "bind", "source": str(src), "options": ["bind", "ro"]},
        {"destination": "/rw", "type": "none", "source": str(src), "options": ["rbind", "rw"]},
        {"destination": "/etc/single.txt", "type": "bind", "source": str(single), "options": ["bind", "ro"]},
    ]
    bundle.sh("cat /data/file; (echo x > /data/new) 2>&1; echo y > /rw/written; cat /etc/single.txt; "
              "grep ' /data ' /proc/self/mountinfo")
    out = clave.output()
    assert out.startswith("hello\n") and "Read-only file system" in out and "one file" in out
    assert out.splitlines()[-1].split()[5].split(",")[0] == "ro"
    assert (src / "written").read_text() == "y\n"
    assert not (src / "new").exists()


@pytest.fixture
def src_with_submount(tmp_path: Path) -> Iterator[Path]:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "clave-test", str(src / "sub")], check=True)
    (src / "sub" / "inner").write_text("submount\n")
    yield src
    subprocess.run(["umount", str(src / "sub")], check=True)


def test_rbind_carries_submounts_bind_does_not(clave: Clave, bundle: Bundle, src_with_submount: Path) -> None:
    bundle.private_rootfs()  # the mount point is created in the rootfs
    bundle.config["mounts"] += [
        {"destination": "/r", "type": "bind", "source": str(src_with_submount), "options": ["rbind"]},
        {"destination": "/b", "type": "bind", "source": str(src_with_submount), "options": ["bind"]},
    ]
    bundle.sh("cat /r/sub/inner; ls /b/sub | wc -l")
    assert clave.output().split() == ["submount", "0"]


def test_tmpfs_options(clave: Clave, bundle: Bundle) -> None:
    bundle.private_rootfs()  # the mount point is created in the rootfs
    bundle.config["mounts"].append({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                                    "options": ["nosuid", "nodev", "noexec", "mode=700", "size=1m", "uid=5"]})
    bundle.sh("grep ' /scratch ' /proc/self/mounts; stat -c '%a %u' /scratch; cp /bin/busybox /scratch/bb; "
              "/scratch/bb true 2>&1 || echo noexec")
    first, second, *rest = clave.output().splitlines()
    options = first.split()[3].split(",")
    assert {"nosuid", "nodev", "noexec", "size=1024k", "mode=700", "uid=5"} <= set(options), options
    assert second == "700 5"
    assert rest[-1] == "noexec"


@pytest.mark.parametrize(("option", "tag"), [("rshared", "shared:"), ("private", None), ("unbindable", "unbindable")])
def test_mount_propagation_flags(clave: Clave, bundle: Bundle, option: str, tag: str | None) -> None:
    bundle.private_rootfs()  # the mount point is created in the rootfs
    bundle.config["mounts"].append({"destination": "/prop", "type": "tmpfs", "source": "tmpfs", "options": [option]})
    bundle.args("cat", "/proc/self/mountinfo")
    (line,) = mountinfo_of(clave.output(), "/prop")
    optional = line.split(" - ")[0].split()[6:]
    if tag is None:
        assert optional == [], line
    else:
        assert any(field.startswith(tag) for field in optional), line


@pytest.mark.parametrize(("propagation", "tag"), [("shared", "shared:"), ("private", None), ("rslave", None)])
def test_rootfs_propagation(clave: Clave, bundle: Bundle, propagation: str, tag: str | None) -> None:
    bundle.linux["rootfsPropagation"] = propagation
    bundle.args("cat", "/proc/self/mountinfo")
    (line,) = mountinfo_of(clave.output(), "/")
    optional = line.split(" - ")[0].split()[6:]
    if tag is None:
        assert not any(field.startswith("shared:") for field in optional), line
    else:
        assert any(field.startswith(tag) for field in optional), line


def test_symlinked_destinations_stay_inside_rootfs(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    rootfs = bundle.private_rootfs()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("host file\n")
    (rootfs / "abs").symlink_to(victim)  # absolute: must mean <rootfs>/<victim>
    (rootfs / "rel").symlink_to("../../../../../../../../" + str(victim).lstrip("/"))
    (rootfs / "loop").symlink_to("/loop/..")
    bundle.config["mounts"] += [
        {"destination": "/abs/m1", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/rel/m2", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/../../etc/m3", "type": "tmpfs", "source": "tmpfs"},
    ]
    bundle.sh(f"grep -c ' {victim}/m[12] ' /proc/self/mountinfo; grep -c ' /etc/m3 ' /proc/self/mountinfo")
    assert clave.output().split() == ["2", "1"]
    assert sorted(os.listdir(victim)) == ["keep"], "a mount escaped the rootfs"
    assert not Path("/etc/m3").exists()
    assert (rootfs / str(victim).lstrip("/") / "m1").is_dir()


def test_bind_file_over_symlink_to_host_file(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    rootfs = bundle.private_rootfs()
    target = tmp_path / "hostfile"
    target.write_text("untouched\n")
    (rootfs / "etc" / "link").symlink_to(target)
    src = tmp_path / "src"
    src.write_text("mounted\n")
    bundle.config["mounts"].append({"destination": "/etc/link", "type": "bind", "source": str(src),
                                    "options": ["bind"]})
    bundle.args("cat", str(target))
    assert clave.output() == "mounted\n"
    assert target.read_text() == "untouched\n"


def test_default_devices(clave: Clave, bundle: Bundle) -> None:
    devices = ["null", "zero", "full", "random", "urandom", "tty"]
    bundle.sh("for d in " + " ".join(devices) + "; do stat -c '%n %F %t:%T %a' /dev/$d; done; "
              "for l in ptmx fd stdin stdout stderr; do readlink /dev/$l; done")
    lines = clave.output().splitlines()
    expected = {"null": "1:3", "zero": "1:5", "full": "1:7", "random": "1:8", "urandom": "1:9", "tty": "5:0"}
    for line, name in zip(lines, devices, strict=False):
        path, *kind, numbers, mode = line.split()
        assert path == f"/dev/{name}"
        assert " ".join(kind) == "character special file"
        major, minor = (int(x, 16) for x in numbers.split(":"))
        assert f"{major}:{minor}" == expected[name]
        assert mode == "666"
    assert lines[len(devices):] == ["pts/ptmx", "/proc/self/fd", "/proc/self/fd/0", "/proc/self/fd/1",
                                    "/proc/self/fd/2"]


def test_linux_devices(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["devices"] = [
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666},
        {"path": "/dev/owned", "type": "c", "major": 1, "minor": 5, "fileMode": 0o620, "uid": 7, "gid": 8},
        {"path": "/dev/sub/myfifo", "type": "p"},
    ]
    bundle.sh("stat -c '%F %t:%T %a' /dev/mynull; echo data > /dev/mynull && echo wrote; "
              "stat -c '%t:%T %a %u %g' /dev/owned; stat -c %F /dev/sub/myfifo")
    assert clave.output().splitlines() == ["character special file 1:3 666", "wrote", "1:5 620 7 8", "fifo"]


def test_device_cgroup_denies_unlisted(clave: Clave, bundle: Bundle) -> None:
    bundle.linux["devices"] = [{"path": "/dev/mymem", "type": "c", "major": 1, "minor": 1}]
    bundle.linux["resources"]["devices"] = [{"allow": False, "access": "rwm"},
                                            {"allow": False, "type": "c", "major": 1, "minor": 1, "access": "rwm"}]
    # linux.devices are allowed after the config's rules, as runc does; an unlisted node made by mknod is not.
    bundle.sh("mknod /dev/loopme b 7 0; head -c1 /dev/loopme >/dev/null 2>&1 && echo open || echo denied")
    assert clave.output().split()[-1] == "denied"


def test_masked_and_readonly_paths(clave: Clave, bundle: Bundle) -> None:
    masked = [p for p in bundle.linux["maskedPaths"] if os.path.exists(p)]
    assert masked, "none of the default masked paths exists on this host"
    script = "".join(f"echo {p}=$(cat {p} | wc -c) $(ls {p} 2>/dev/null | wc -l); " for p in masked)
    bundle.sh(script + "(echo 1 > /proc/sys/kernel/ns_last_pid) 2>&1 || true")
    out = clave.output().splitlines()
    assert out[:-1] == [f"{p}=0 0" if os.path.isdir(p) else f"{p}=0 1" for p in masked]
    assert "Read-only file system" in out[-1]


def test_no_pivot(clave: Clave, bundle: Bundle) -> None:
    bundle.sh("cat /out/../etc/passwd | head -1; ls /")
    out = clave.output("--no-pivot")
    assert out.startswith("root:x:0:0")
    assert "bin" in out.split() and "tmp" in out.split()


def test_missing_bind_source(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    bundle.config["mounts"].append({"destination": "/x", "type": "bind", "source": "/nonexistent/src",
                                    "options": ["bind"]})
    bundle.write()
    assert "/nonexistent/src" in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()  # type: ignore[operator]


def test_unknown_filesystem(clave: Clave, bundle: Bundle, assert_clean: object) -> None:
    bundle.private_rootfs()  # the mount point is created in the rootfs
    bundle.config["mounts"].append({"destination": "/x", "type": "nosuchfs", "source": "none"})
    bundle.write()
    assert "/x" in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()  # type: ignore[operator]


def test_relative_bind_source_is_relative_to_bundle(clave: Clave, bundle: Bundle, tmp_path: Path) -> None:
    bundle.private_rootfs()  # the mount point is created in the rootfs
    (bundle.path / "data").mkdir()
    (bundle.path / "data" / "f").write_text("from bundle\n")
    bundle.config["mounts"].append({"destination": "/data", "type": "bind", "source": "data", "options": ["bind"]})
    bundle.args("cat", "/data/f")
    bundle.write()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([CLAVE, "--root", str(clave.root), "run", "--bundle", str(bundle.path), clave.id()],
                            cwd=elsewhere, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"from bundle\n"
