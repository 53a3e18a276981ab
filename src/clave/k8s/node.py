"""`clave node install` / `clave node uninstall`: put Clave on a Kubernetes node and into containerd's config.

install:
- copies the running ``clave`` package to ``PREFIX/lib/python/clave`` (bytecode compiled) and writes launchers
  ``PREFIX/bin/clave`` and ``PREFIX/bin/containerd-shim-clave-v2`` (clave.tools.launcher's: this interpreter,
  ``-IS``, the copy first on the import path, the environment's site-packages for the dependencies);
- writes one runtime config per runtime (``PREFIX/etc/runtime-<name>.toml``, clave.k8s.runtimeconfig);
- appends one marked block to containerd's config.toml with the runtimes ``clave`` (native), ``clave-enclave`` and
  ``clave-vm`` under the CRI plugin: ``runtime_type = "io.containerd.clave.v2"``, ``runtime_path`` to the shim
  launcher, ``options = { ConfigPath = ... }``. Nothing else of the file is touched: no reformatting, every entry
  and comment stays. The result is parsed (tomllib) and checked before it replaces the file.
- keeps a byte-exact backup of the file beside it (``FILE.clave-orig``) and a record (``FILE.clave-install.json``:
  checksums of the original and installed file, what was installed).

uninstall puts the original back byte for byte (mode and owner too) after checking the backup against its
checksum, and refuses, in one line, when the file changed since install; then removes what install put under
the prefix. Both are idempotent and print every change.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import shutil
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clave.errors import ClaveError
from clave.k8s import runtimeconfig

DEFAULT_PREFIX = "/opt/clave"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
# containerd 1.6 finds a shim by name on its PATH and does not honour runtime_path for pods (checked with
# 1.6.20): a link to the shim goes in a PATH directory, as kata-deploy does; runtime_path serves newer ones.
DEFAULT_BIN_DIR = "/usr/local/bin"
RUNTIME_TYPE = "io.containerd.clave.v2"
SHIM = "containerd-shim-clave-v2"
# containerd runtime name (the CRI handler a RuntimeClass names) -> Clave handler
RUNTIMES = {"clave": "native", "clave-enclave": "enclave", "clave-vm": "vm"}
# Annotations containerd passes from a pod's containers into their OCI spec, per runtime: rune's enclave.* settings.
CONTAINER_ANNOTATIONS = {"clave-enclave": ["enclave.*"]}
# A VM is sized and shaped per pod: the pod's io.clave.vm.* annotations (memory, vcpus, template) reach the spec.
POD_ANNOTATIONS = {"clave-vm": ["io.clave.vm.*"]}
BEGIN = "# >>> clave node install >>> managed block: `clave node uninstall` removes it and restores this file"
END = "# <<< clave node install <<<"
# The CRI plugin's runtimes table in each config version containerd has had.
RUNTIMES_TABLE = {
    1: "plugins.cri.containerd.runtimes",
    2: 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes',
    3: 'plugins."io.containerd.cri.v1.runtime".containerd.runtimes',
}
RECORD_VERSION = 1


class NodeError(ClaveError):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NodeError(f"cannot read {path}: {exc.strerror}") from None


def _write_atomic(path: str, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` in one rename (a reader sees the old file or the new, never half)."""
    tmp = f"{path}.clave-tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise NodeError(f"cannot write {path}: {exc.strerror}") from None


# --- containerd's config ------------------------------------------------------------------------------------


def config_version(text: str, path: str) -> int:
    try:
        version = tomllib.loads(text).get("version", 1)
    except tomllib.TOMLDecodeError as exc:
        raise NodeError(f"{path} is not valid TOML ({exc}): fix it before installing") from None
    if version not in RUNTIMES_TABLE:
        raise NodeError(f"{path}: containerd config version {version!r} is not one Clave knows (1, 2 or 3)")
    return int(version)


def runtime_config_path(prefix: str, name: str) -> str:
    return os.path.join(prefix, "etc", f"runtime-{name}.toml")


def render_block(prefix: str, version: int) -> str:
    table = RUNTIMES_TABLE[version]
    lines = [BEGIN]
    for name in RUNTIMES:
        lines += [f"[{table}.{name}]",
                  f'  runtime_type = "{RUNTIME_TYPE}"',
                  f'  runtime_path = "{os.path.join(prefix, "bin", SHIM)}"']
        if name in CONTAINER_ANNOTATIONS:
            lines.append(f"  container_annotations = {json.dumps(CONTAINER_ANNOTATIONS[name])}")
        if name in POD_ANNOTATIONS:
            lines.append(f"  pod_annotations = {json.dumps(POD_ANNOTATIONS[name])}")
        lines += [f"  [{table}.{name}.options]",
                  f'    ConfigPath = "{runtime_config_path(prefix, name)}"']
    lines.append(END)
    return "\n".join(lines) + "\n"


def split_block(text: str) -> tuple[str, str | None]:
    """(the file without Clave's block, the block or None)."""
    start = text.find(BEGIN + "\n")
    if start < 0:
        return text, None
    end = text.find(END + "\n", start)
    if end < 0:
        raise NodeError(f"Clave's block has no end line ({END!r}): fix the file by hand")
    end += len(END) + 1
    before = text[:start]
    if before.endswith("\n\n"):  # the blank line install put before the block
        before = before[:-1]
    return before + text[end:], text[start:end]


def with_block(text: str, block: str) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "") + block


def check_runtimes(text: str, version: int, prefix: str, path: str) -> None:
    """The edited file must parse and hold the three runtimes with their options, as containerd will read them."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NodeError(f"adding Clave's runtimes would make {path} invalid TOML ({exc}); nothing changed") from None
    table: Any = doc
    for key in _table_keys(version):
        table = table.get(key, {}) if isinstance(table, dict) else {}
    for name in RUNTIMES:
        runtime = table.get(name, {})
        if (runtime.get("runtime_type") != RUNTIME_TYPE
                or runtime.get("options", {}).get("ConfigPath") != runtime_config_path(prefix, name)):
            raise NodeError(f"{path}: runtime {name!r} did not come out as written; nothing changed")


def _table_keys(version: int) -> list[str]:
    return {1: ["plugins", "cri", "containerd", "runtimes"],
            2: ["plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes"],
            3: ["plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes"]}[version]


def defined_runtimes(text: str, version: int) -> list[str]:
    table: Any = tomllib.loads(text)
    for key in _table_keys(version):
        table = table.get(key, {}) if isinstance(table, dict) else {}
    return [name for name in RUNTIMES if name in table]


# --- the install record -------------------------------------------------------------------------------------


@dataclass
class Record:
    """What install did to one containerd config, kept beside it until uninstall."""

    config: str
    prefix: str
    original_sha256: str | None  # None: there was no file
    original_mode: int
    original_owner: tuple[int, int]
    installed_sha256: str
    created_dirs: list[str] = field(default_factory=list)
    shim_link: str | None = None

    @staticmethod
    def path(config: str) -> str:
        return f"{config}.clave-install.json"

    @staticmethod
    def backup(config: str) -> str:
        return f"{config}.clave-orig"

    def save(self) -> None:
        data = {"version": RECORD_VERSION, "config": self.config, "prefix": self.prefix,
                "original_sha256": self.original_sha256, "original_mode": self.original_mode,
                "original_owner": list(self.original_owner), "installed_sha256": self.installed_sha256,
                "created_dirs": self.created_dirs, "shim_link": self.shim_link}
        _write_atomic(self.path(self.config), (json.dumps(data, indent=2) + "\n").encode(), 0o600)

    @classmethod
    def load(cls, config: str) -> Record | None:
        raw = _read(cls.path(config))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            return cls(data["config"], data["prefix"], data["original_sha256"], int(data["original_mode"]),
                       (int(data["original_owner"][0]), int(data["original_owner"][1])), data["installed_sha256"],
                       list(data.get("created_dirs", [])), data.get("shim_link"))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise NodeError(f"{cls.path(config)} is not an install record Clave wrote ({exc})") from None


# --- files under the prefix ---------------------------------------------------------------------------------


def _package_dir() -> str:
    import clave

    return os.path.dirname(os.path.abspath(clave.__file__))


def package_files(source: str) -> list[str]:
    """The package's files relative to its directory: sources and data, no bytecode."""
    found = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith((".pyc", ".pyo")):
                found.append(os.path.relpath(os.path.join(root, name), source))
    return found


def _makedirs(path: str, created: list[str]) -> None:
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except OSError as exc:
            raise NodeError(f"cannot create {directory}: {exc.strerror}") from None
        created.append(directory)


def _put(path: str, data: bytes, mode: int, created: list[str]) -> bool:
    """Write ``path`` if its content or mode differs; True when it changed."""
    try:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) == mode and _read(path) == data:
            return False
    except FileNotFoundError:
        pass
    _makedirs(os.path.dirname(path), created)
    _write_atomic(path, data, mode)
    return True


def install_files(prefix: str, say: Callable[[str], None], created: list[str]) -> None:
    from clave import __version__
    from clave.tools import launcher

    source = _package_dir()
    lib = os.path.join(prefix, "lib", "python")
    dest = os.path.join(lib, "clave")
    if os.path.realpath(source).startswith(os.path.realpath(prefix) + os.sep):
        raise NodeError(f"--prefix {prefix} holds the running clave package ({source}): choose another prefix")
    wanted = package_files(source)
    changed = sum(_put(os.path.join(dest, rel), _read(os.path.join(source, rel)) or b"",
                       stat.S_IMODE(os.stat(os.path.join(source, rel)).st_mode), created) for rel in wanted)
    stale = sorted(set(package_files(dest)) - set(wanted)) if os.path.isdir(dest) else []
    for rel in stale:  # files of an older version
        os.unlink(os.path.join(dest, rel))
    if changed or stale:
        compileall.compile_dir(dest, quiet=2)  # start-up time depends on cached bytecode
        say(f"installed clave {__version__} in {dest} ({len(wanted)} files: {changed} written, {len(stale)} removed)")
    else:
        say(f"unchanged: clave {__version__} in {dest}")
    package_root = os.path.realpath(os.path.dirname(source))
    paths = [lib] + [p for p in launcher.import_paths() if os.path.realpath(p) != package_root]
    for name, module in launcher.SCRIPTS.items():
        path = os.path.join(prefix, "bin", name)
        if _put(path, launcher.launcher(module, paths).encode(), 0o755, created):
            say(f"wrote {path}")
        else:
            say(f"unchanged: {path}")
    for name, handler in RUNTIMES.items():
        path = runtime_config_path(prefix, name)
        text = runtimeconfig.render(runtimeconfig.RuntimeConfig(name, handler))
        if _put(path, text.encode(), 0o644, created):
            say(f"wrote {path} (runtime {name}: handler {handler})")
        else:
            say(f"unchanged: {path}")


def remove_files(prefix: str, created_dirs: list[str], say: Callable[[str], None]) -> None:
    dest = os.path.join(prefix, "lib", "python", "clave")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
        say(f"removed {dest}")
    from clave.tools import launcher

    owned = [os.path.join(prefix, "bin", name) for name in launcher.SCRIPTS]  # what install_files wrote
    owned += [runtime_config_path(prefix, name) for name in RUNTIMES]
    for path in owned:
        try:
            os.unlink(path)
            say(f"removed {path}")
        except FileNotFoundError:
            pass
    for directory in sorted(created_dirs, key=len, reverse=True):  # only the ones install made, if empty
        try:
            os.rmdir(directory)
            say(f"removed {directory}/")
        except OSError:
            pass


def link_shim(prefix: str, bin_dir: str, say: Callable[[str], None], created: list[str]) -> str:
    """``bin_dir/containerd-shim-clave-v2`` -> the installed shim; another file there is left alone (refused)."""
    link, target = os.path.join(bin_dir, SHIM), os.path.join(prefix, "bin", SHIM)
    if os.path.islink(link) and os.readlink(link) == target:
        say(f"unchanged: {link} -> {target}")
        return link
    if os.path.lexists(link):
        raise NodeError(f"{link} exists and is not Clave's link to {target}: remove it, or pass another --bin-dir")
    _makedirs(bin_dir, created)
    try:
        os.symlink(target, link)
    except OSError as exc:
        raise NodeError(f"cannot link {link}: {exc.strerror}") from None
    say(f"linked {link} -> {target} (containerd finds the shim on its PATH)")
    return link


def unlink_shim(link: str | None, prefix: str, say: Callable[[str], None]) -> None:
    if link and os.path.islink(link) and os.readlink(link) == os.path.join(prefix, "bin", SHIM):
        os.unlink(link)
        say(f"removed {link}")


# --- the two verbs ------------------------------------------------------------------------------------------


def install(prefix: str = DEFAULT_PREFIX, config: str = DEFAULT_CONTAINERD_CONFIG,
            say: Callable[[str], None] = print, bin_dir: str = DEFAULT_BIN_DIR) -> bool:
    """Install; True when containerd's config changed (containerd must then be restarted to see it)."""
    prefix, config, bin_dir = os.path.abspath(prefix), os.path.abspath(config), os.path.abspath(bin_dir)
    record = Record.load(config)
    if record is not None and record.prefix != prefix:
        raise NodeError(f"{config} was installed with --prefix {record.prefix}: uninstall first to use {prefix}")
    original = _read(config)
    text = (original or b"").decode("utf-8", errors="surrogateescape")
    if record is not None:
        if sha256(original or b"") != record.installed_sha256:
            raise NodeError(f"{config} changed since `clave node install` (its checksum differs from "
                            f"{Record.path(config)}): merge by hand from {Record.backup(config)}")
        install_files(prefix, say, record.created_dirs)
        record.shim_link = link_shim(prefix, bin_dir, say, record.created_dirs)
        record.save()
        say(f"unchanged: {config} already has the runtimes {', '.join(RUNTIMES)}")
        return False
    if split_block(text)[1] is not None:
        raise NodeError(f"{config} has a Clave block but no install record ({Record.path(config)}): remove the "
                        "block by hand, then install")
    version = config_version(text, config) if original is not None else 2
    taken = defined_runtimes(text, version)
    if taken:
        raise NodeError(f"{config} already defines runtime {taken[0]!r} "
                        f"({RUNTIMES_TABLE[version]}.{taken[0]}): remove it, then install")
    new_text = with_block(text if original is not None else "version = 2\n", render_block(prefix, version))
    check_runtimes(new_text, version, prefix, config)
    created: list[str] = []
    if original is not None:
        st = os.stat(config)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    else:
        mode, owner = 0o644, (os.getuid(), os.getgid())
    new = new_text.encode("utf-8", errors="surrogateescape")
    record = Record(config, prefix, sha256(original) if original is not None else None, mode, owner, sha256(new),
                    created)
    try:
        install_files(prefix, say, created)
        record.shim_link = link_shim(prefix, bin_dir, say, created)
        _makedirs(os.path.dirname(config), created)
        if original is not None:
            _write_atomic(Record.backup(config), original, mode, owner)
        record.save()
        _write_atomic(config, new, mode, owner)
    except BaseException:
        # Nothing half-done: the config as it was, no backup or record, nothing under the prefix.
        if original is not None and _read(config) != original:
            _write_atomic(config, original, mode, owner)
        for leftover in (Record.backup(config), Record.path(config)) + (() if original is not None else (config,)):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        unlink_shim(record.shim_link, prefix, lambda line: None)
        remove_files(prefix, created, lambda line: None)
        raise
    backup = f"backup {Record.backup(config)}" if original is not None else "there was none before"
    say(f"{config}: added runtimes {', '.join(RUNTIMES)} ({RUNTIME_TYPE}) in one marked block ({backup}; "
        f"sha256 {record.original_sha256 or '-'})")
    say("restart containerd to use them (systemctl restart containerd)")
    return True


def uninstall(config: str = DEFAULT_CONTAINERD_CONFIG, say: Callable[[str], None] = print) -> bool:
    """Uninstall; True when containerd's config changed."""
    config = os.path.abspath(config)
    record = Record.load(config)
    current = _read(config)
    if record is None:
        if current is not None and split_block(current.decode("utf-8", errors="surrogateescape"))[1] is not None:
            raise NodeError(f"{config} has a Clave block but no install record ({Record.path(config)}): "
                            "remove the block by hand")
        say(f"not installed in {config}: nothing to do")
        return False
    if current is None or sha256(current) != record.installed_sha256:
        raise NodeError(f"{config} changed since `clave node install`: not overwriting it; restore it by hand "
                        f"from {Record.backup(config)} (then remove {Record.path(config)})")
    if record.original_sha256 is None:
        os.unlink(config)
        say(f"removed {config} (there was none before install)")
    else:
        original = _read(Record.backup(config))
        if original is None or sha256(original) != record.original_sha256:
            raise NodeError(f"backup {Record.backup(config)} is missing or does not match its checksum: "
                            f"{config} left as it is")
        _write_atomic(config, original, record.original_mode, record.original_owner)
        os.unlink(Record.backup(config))
        say(f"{config}: restored byte for byte (sha256 {record.original_sha256})")
    os.unlink(Record.path(config))
    unlink_shim(record.shim_link, record.prefix, say)
    remove_files(record.prefix, record.created_dirs, say)
    say("restart containerd to drop the runtimes (systemctl restart containerd)")
    return True
