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


def write_files(rootfs: str, files: dict[str, str | bytes]) -> None:
    """Write ``files`` (image path → content) into a rootfs."""
    for path, content in files.items():
        target = os.path.join(rootfs, path.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def make_app_bundle(bundle: str, files: dict[str, str | bytes], args: list[str], cwd: str = "/",
                    env: list[str] | tuple[str, ...] = (), enclave: bool = True) -> dict[str, Any]:
    """A bundle whose busybox image also holds an app (``files``) run by ``args`` (``python3 app.py``): a
    WebAssembly enclave container (``ENCLAVE_TYPE=wasm``, read-only root) unless ``enclave`` is false."""
    config = make_bundle(bundle, args)
    write_files(os.path.join(bundle, "rootfs"), files)
    config["process"]["cwd"] = cwd
    config["process"]["env"] += list(env) + (["ENCLAVE_TYPE=wasm"] if enclave else [])
    config["root"]["readonly"] = True
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def host_python_mounts(python: str = "/usr/bin/python3") -> list[dict[str, Any]]:
    """Read-only bind mounts that let a native busybox container run the host's CPython as /usr/bin/python3:
    the interpreter, its standard library and the shared libraries it links (the same app then runs natively
    and in the WebAssembly enclave, for comparison)."""
    real = os.path.realpath(python)
    version = os.path.basename(real)  # python3.11
    sources = [(real, "/usr/bin/python3"), (f"/usr/lib/{version}", f"/usr/lib/{version}")]
    ldd = subprocess.run(["ldd", real], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
        if path.startswith("/"):
            directory = os.path.dirname(path)
            sources.append((os.path.realpath(directory), directory))
    mounts, seen = [], set()
    for source, destination in sources:
        if destination not in seen:
            seen.add(destination)
            mounts.append({"destination": destination, "type": "bind", "source": source,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
    return mounts


def write_image_archive(rootfs: str, dest: str, tag: str, cmd: list[str] | None = None) -> str:
    """Write ``rootfs`` as a one-layer image in the docker-archive format (`docker save`'s, which `docker
    load` and `podman load` read), tagged ``tag``; returns dest. No registry is involved."""
    import hashlib
    import io
    import tarfile

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name in sorted(os.listdir(rootfs)):
            tar.add(os.path.join(rootfs, name), arcname=name)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    image_config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Cmd": cmd or ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "clave.tools.bundles.write_image_archive"}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.removeprefix("sha256:") + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}]
    with tarfile.open(dest, "w") as out:
        for name, data in ((config_name, config_bytes), (layer_name, layer_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return dest
