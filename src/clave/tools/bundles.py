"""Build OCI bundles without a registry: a busybox rootfs from Debian's busybox-static, and a config.json
from `clave spec`'s defaults. Used by `make demo`, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

BUSYBOX = "/bin/busybox"
_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "var", "run")


def make_busybox_rootfs(dest: str, busybox: str = BUSYBOX) -> str:
    """Populate ``dest`` with busybox and a symlink per applet; returns dest."""
    if not os.path.exists(busybox):
        raise FileNotFoundError(f"{busybox} not found: install Debian's busybox-static")
    for d in _DIRS:
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(dest, "bin/busybox"))
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = os.path.join(dest, applet)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink("/bin/busybox", link)
    with open(os.path.join(dest, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(dest, "etc/group"), "w") as f:
        f.write("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    return dest


def make_bundle(bundle: str, args: list[str], rootfs: str | None = None, terminal: bool = False,
                **overrides: Any) -> dict[str, Any]:
    """Write ``bundle/config.json`` (defaults of `clave spec`, not read-only, no tty) and a busybox rootfs
    unless ``rootfs`` names an existing one. Returns the config."""
    from clave.config.defaults import default_spec

    os.makedirs(bundle, exist_ok=True)
    config = default_spec()
    config["process"]["args"] = args
    config["process"]["terminal"] = terminal
    config["root"]["readonly"] = False
    if rootfs is None:
        make_busybox_rootfs(os.path.join(bundle, "rootfs"))
    else:
        config["root"]["path"] = rootfs
    config.update(overrides)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config
