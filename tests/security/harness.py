"""Run real containers through the `clave` CLI and find what they leave behind (state dir, cgroup, mount,
process). Shared by tests/security and tests/faults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import alive

CLAVE = str(Path(sys.executable).with_name("clave"))
BUSYBOX = "/bin/busybox"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROBE_SOURCE = Path(__file__).with_name("probe.c")


def cgroup_hierarchies() -> list[Path]:
    """The mount point of every cgroup hierarchy (one on v2; one per controller plus `unified` on v1/hybrid)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]


def remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup and its (empty) children, deepest first."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def build_probe(dest: Path) -> Path | None:
    """Compile probe.c statically to ``dest``; None if gcc or a static libc is missing."""
    if shutil.which("gcc") is None:
        return None
    result = subprocess.run(["gcc", "-static", "-O1", "-o", str(dest), str(PROBE_SOURCE)], capture_output=True)
    return dest if result.returncode == 0 else None


class Runner:
    """Bundles under ``base``, state under ``base/state``, cgroups under ``/<group>/<id>`` in every hierarchy."""

    def __init__(self, base: Path, rootfs: Path, group: str) -> None:
        self.base = base
        self.root = base / "state"
        self.rootfs = rootfs
        self.group = group
        self.ids: list[str] = []

    def config(self, *args: str) -> dict[str, Any]:
        """`clave spec`'s defaults (capabilities, seccomp, masked/readonly paths, namespaces) running ``args``."""
        from clave.config.defaults import default_spec

        config = default_spec()
        config["process"]["args"] = list(args)
        config["process"]["terminal"] = False
        config["root"]["path"] = str(self.rootfs)
        return config

    def bundle(self, container_id: str, config: dict[str, Any]) -> Path:
        bundle = self.base / container_id
        bundle.mkdir(exist_ok=True)
        config.setdefault("linux", {})["cgroupsPath"] = f"/{self.group}/{container_id}"
        (bundle / "config.json").write_text(json.dumps(config))
        if container_id not in self.ids:
            self.ids.append(container_id)
        return bundle

    def clave(self, *args: str, timeout: float = 30, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLAVE, "--root", str(self.root), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL)

    def create(self, container_id: str, bundle: Path, *args: str, env: dict[str, str] | None = None) -> str:
        """`clave create`; returns its stderr ("" on success). The container's process inherits create's stdio,
        so stdout goes to /dev/null and stderr to a file: a pipe would stay open as long as the container."""
        err_path = bundle / "create.err"
        with open(err_path, "w+") as err:
            code = subprocess.call([CLAVE, "--root", str(self.root), "create", "--bundle", str(bundle), *args,
                                    container_id], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                   env=env, timeout=30)
            err.seek(0)
            message = err.read().strip()
        return "" if code == 0 else message or f"clave create exited with {code}"

    def run(self, container_id: str, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """`clave run` in the foreground: the container's output and exit status."""
        bundle = self.bundle(container_id, config)
        return self.clave("run", "--bundle", str(bundle), container_id)

    def runc(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Debian's runc, the reference, with a state root of its own beside ours."""
        return subprocess.run(["runc", "--root", str(self.base / "runc-state"), *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def reference_run(self, container_id: str, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """`runc run` of the same config, in a bundle of its own (``<id>-runc``); deleted by cleanup."""
        bundle = self.bundle(f"{container_id}-runc", config)
        return self.runc("run", "--bundle", str(bundle), f"{container_id}-runc")

    def cgroup_dirs(self, container_id: str) -> list[Path]:
        return [h / self.group / container_id for h in cgroup_hierarchies() if (h / self.group / container_id).is_dir()]

    def leftovers(self, container_id: str, init_pid: int = 0) -> list[str]:
        """Everything of ``container_id`` still on the host, one line per item (empty: nothing left)."""
        found = []
        if (self.root / container_id).exists():
            found.append(f"state dir {self.root / container_id}")
        found += [f"cgroup {p}" for p in self.cgroup_dirs(container_id)]
        marker = str(self.base / container_id)
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if marker in line or str(self.rootfs) in line]
        found += [f"process {pid}" for pid in processes_in_cgroup(f"/{self.group}/{container_id}")]
        if init_pid and alive(init_pid):
            found.append(f"init {init_pid}")
        return found

    def cleanup(self) -> list[str]:
        """Force-delete every container this runner made; returns what could not be cleaned."""
        left = []
        for container_id in self.ids:
            if (self.root / container_id).exists():
                self.clave("delete", "--force", container_id)
            if (self.base / "runc-state" / container_id).exists():
                self.runc("delete", "--force", container_id)
            left += wait_for_nothing(lambda cid=container_id: self.leftovers(cid))  # type: ignore[misc]
        for hierarchy in cgroup_hierarchies():
            remove_cgroup_tree(hierarchy / self.group)
        return left


def processes_in_cgroup(path: str) -> list[int]:
    """Pids of the processes whose /proc/PID/cgroup lists ``path`` (or a child of it) in any hierarchy."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        if any(line.split(":", 2)[2] == path or line.split(":", 2)[2].startswith(path + "/") for line in lines):
            if alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def wait_for_nothing(check: Any, timeout: float = 5.0) -> list[str]:
    """Poll ``check()`` until it reports nothing (processes take a moment to die); returns the last report."""
    deadline = time.monotonic() + timeout
    found: list[str] = check()
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = check()
    return found
