"""The one place that reads and validates an OCI bundle's config.json.

The validated document stays a plain dict (the OCI field names, camelCase) so handlers can pass pieces of it
to the layers below untouched; this module guarantees the shapes those layers rely on, and reports the first
violation as one line naming the JSON path.
"""

from __future__ import annotations

import os

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_OCI_MAJOR = "1."

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


class ConfigError(Exception):
    """config.json is missing, unparsable or invalid. One line."""


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"config.json: {path}: {message}")


def _expect(value: Any, kind: type | tuple[type, ...], path: str, what: str) -> Any:
    # bool is an int in Python; JSON booleans must not pass as numbers.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(path, f"must be {what}")
    return value


def _str_list(value: Any, path: str) -> list[str]:
    _expect(value, list, path, "an array of strings")
    for i, item in enumerate(value):
        _expect(item, str, f"{path}[{i}]", "a string")
    return value


def _uint(value: Any, path: str) -> int:
    _expect(value, int, path, "an integer")
    if value < 0:
        raise _fail(path, "must not be negative")
    return value


# runc's range for every uid and gid a config names. 2^32-1 is -1 to setresuid ("leave unchanged"), so a
# wider range would let a config that asks for an unprivileged user keep the runtime's root.
MAX_ID = 2147483647


def check_id(value: Any, path: str) -> int:
    """A uid or gid: an integer in runc's range 0-2147483647."""
    _expect(value, int, path, "an integer")
    if not 0 <= value <= MAX_ID:
        raise _fail(path, f"uids and gids must be in range 0-{MAX_ID} (got {value})")
    return value


def load_bundle(bundle: str) -> dict[str, Any]:
    """Read ``<bundle>/config.json`` and validate it; returns the document."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config.json not found in bundle {bundle}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = fastjson.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"config.json: invalid JSON: {exc}") from None
    validate(doc)
    return doc


def validate(doc: Any) -> None:
    _expect(doc, dict, "(top level)", "a JSON object")
    version = _expect(doc.get("ociVersion"), str, "ociVersion", "a string (required)")
    if not version.startswith(SUPPORTED_OCI_MAJOR):
        raise _fail("ociVersion", f"unsupported version {version!r} (clave supports 1.x)")
    root = _expect(doc.get("root"), dict, "root", "an object with a path (required on Linux)")
    _expect(root.get("path"), str, "root.path", "a string (required)")
    if "readonly" in root:
        _expect(root["readonly"], bool, "root.readonly", "a boolean")
    if "process" in doc:
        _validate_process(doc["process"], "process")
    if "hostname" in doc:
        _expect(doc["hostname"], str, "hostname", "a string")
    if "domainname" in doc:
        _expect(doc["domainname"], str, "domainname", "a string")
    for i, mount in enumerate(_expect(doc.get("mounts", []), list, "mounts", "an array")):
        _validate_mount(mount, f"mounts[{i}]")
    annotations = _expect(doc.get("annotations", {}), dict, "annotations", "an object")
    for key, value in annotations.items():
        _expect(value, str, f"annotations.{key}", "a string")
    hooks = _expect(doc.get("hooks", {}), dict, "hooks", "an object")
    for kind, entries in hooks.items():
        if kind not in HOOK_KINDS:
            continue  # unknown hook kinds are ignored, as the spec allows extensions
        for i, hook in enumerate(_expect(entries, list, f"hooks.{kind}", "an array")):
            _validate_hook(hook, f"hooks.{kind}[{i}]")
    if "linux" in doc:
        _validate_linux(_expect(doc["linux"], dict, "linux", "an object"))


def validate_process(process: Any, source: str) -> None:
    """A process that ``exec`` starts (from ``source``: a --process file, the shim's request...), checked as
    config.json's own process is; errors name ``source`` instead of config.json."""
    try:
        _validate_process(process, "process")
    except ConfigError as exc:
        raise ConfigError(source + str(exc).removeprefix("config.json")) from None


def _validate_process(process: Any, path: str) -> None:
    _expect(process, dict, path, "an object")
    args = process.get("args")
    if not args:
        raise _fail(f"{path}.args", "must be a non-empty array of strings")
    _str_list(args, f"{path}.args")
    cwd = _expect(process.get("cwd"), str, f"{path}.cwd", "a string (required)")
    if not cwd.startswith("/"):
        raise _fail(f"{path}.cwd", f"must be an absolute path, got {cwd!r}")
    if "env" in process:
        _str_list(process["env"], f"{path}.env")
    if "terminal" in process:
        _expect(process["terminal"], bool, f"{path}.terminal", "a boolean")
    user = _expect(process.get("user", {}), dict, f"{path}.user", "an object")
    for key in ("uid", "gid"):
        if key in user:
            check_id(user[key], f"{path}.user.{key}")
    if "umask" in user:
        _uint(user["umask"], f"{path}.user.umask")
    for i, gid in enumerate(_expect(user.get("additionalGids", []), list, f"{path}.user.additionalGids", "an array")):
        check_id(gid, f"{path}.user.additionalGids[{i}]")
    caps = _expect(process.get("capabilities", {}), dict, f"{path}.capabilities", "an object")
    for key, names in caps.items():
        _str_list(names, f"{path}.capabilities.{key}")
    for i, rlimit in enumerate(_expect(process.get("rlimits", []), list, f"{path}.rlimits", "an array")):
        _expect(rlimit, dict, f"{path}.rlimits[{i}]", "an object")
        _expect(rlimit.get("type"), str, f"{path}.rlimits[{i}].type", "a string")
        _uint(rlimit.get("soft"), f"{path}.rlimits[{i}].soft")
        _uint(rlimit.get("hard"), f"{path}.rlimits[{i}].hard")
    if "noNewPrivileges" in process:
        _expect(process["noNewPrivileges"], bool, f"{path}.noNewPrivileges", "a boolean")
    if "oomScoreAdj" in process:
        score = _expect(process["oomScoreAdj"], int, f"{path}.oomScoreAdj", "an integer")
        if not -1000 <= score <= 1000:
            raise _fail(f"{path}.oomScoreAdj", "must be between -1000 and 1000")
    if "consoleSize" in process:
        size = _expect(process["consoleSize"], dict, f"{path}.consoleSize", "an object")
        _uint(size.get("height", 0), f"{path}.consoleSize.height")
        _uint(size.get("width", 0), f"{path}.consoleSize.width")


def _validate_mount(mount: Any, path: str) -> None:
    _expect(mount, dict, path, "an object")
    dest = _expect(mount.get("destination"), str, f"{path}.destination", "a string (required)")
    if not dest:
        raise _fail(f"{path}.destination", "must not be empty")
    for key in ("type", "source"):
        if key in mount:
            _expect(mount[key], str, f"{path}.{key}", "a string")
    if "options" in mount:
        _str_list(mount["options"], f"{path}.options")
    for key in ("uidMappings", "gidMappings"):
        if key in mount:
            _validate_id_mappings(mount[key], f"{path}.{key}")


def _validate_hook(hook: Any, path: str) -> None:
    _expect(hook, dict, path, "an object")
    hook_path = _expect(hook.get("path"), str, f"{path}.path", "a string (required)")
    if not hook_path.startswith("/"):
        raise _fail(f"{path}.path", f"must be an absolute path, got {hook_path!r}")
    for key in ("args", "env"):
        if key in hook:
            _str_list(hook[key], f"{path}.{key}")
    if "timeout" in hook:
        timeout = _expect(hook["timeout"], int, f"{path}.timeout", "an integer")
        if timeout <= 0:
            raise _fail(f"{path}.timeout", "must be greater than zero")


def _validate_id_mappings(mappings: Any, path: str) -> None:
    for i, m in enumerate(_expect(mappings, list, path, "an array")):
        _expect(m, dict, f"{path}[{i}]", "an object")
        for key in ("containerID", "hostID"):
            check_id(m.get(key), f"{path}[{i}].{key}")
        if _uint(m.get("size"), f"{path}[{i}].size") == 0:
            raise _fail(f"{path}[{i}].size", "must be at least 1")


def _validate_linux(linux: dict[str, Any]) -> None:
    seen: set[str] = set()
    for i, ns in enumerate(_expect(linux.get("namespaces", []), list, "linux.namespaces", "an array")):
        _expect(ns, dict, f"linux.namespaces[{i}]", "an object")
        ns_type = ns.get("type")
        if ns_type not in NAMESPACE_TYPES:
            raise _fail(f"linux.namespaces[{i}].type", f"unknown namespace type {ns_type!r}")
        if ns_type in seen:
            raise _fail(f"linux.namespaces[{i}]", f"duplicate namespace {ns_type!r}")
        seen.add(ns_type)
        if "path" in ns:
            ns_path = _expect(ns["path"], str, f"linux.namespaces[{i}].path", "a string")
            if not ns_path.startswith("/"):
                raise _fail(f"linux.namespaces[{i}].path", "must be an absolute path")
    for key in ("uidMappings", "gidMappings"):
        if key in linux:
            _validate_id_mappings(linux[key], f"linux.{key}")
    if ("uidMappings" in linux or "gidMappings" in linux) and "user" not in seen:
        raise _fail("linux.uidMappings", "user namespace mappings need a user namespace")
    for i, dev in enumerate(_expect(linux.get("devices", []), list, "linux.devices", "an array")):
        _expect(dev, dict, f"linux.devices[{i}]", "an object")
        dev_path = _expect(dev.get("path"), str, f"linux.devices[{i}].path", "a string")
        if not dev_path.startswith("/"):
            raise _fail(f"linux.devices[{i}].path", "must be an absolute path")
        if dev.get("type") not in ("c", "b", "u", "p"):
            raise _fail(f"linux.devices[{i}].type", "must be one of c, b, u, p")
        if dev["type"] != "p":
            _uint(dev.get("major"), f"linux.devices[{i}].major")
            _uint(dev.get("minor"), f"linux.devices[{i}].minor")
    sysctl = _expect(linux.get("sysctl", {}), dict, "linux.sysctl", "an object")
    for key, value in sysctl.items():
        _expect(value, str, f"linux.sysctl.{key}", "a string")
    if "cgroupsPath" in linux:
        _expect(linux["cgroupsPath"], str, "linux.cgroupsPath", "a string")
    if "resources" in linux:
        _expect(linux["resources"], dict, "linux.resources", "an object")
    for key in ("maskedPaths", "readonlyPaths"):
        if key in linux:
            _str_list(linux[key], f"linux.{key}")
    if "rootfsPropagation" in linux and linux["rootfsPropagation"] not in (
        "shared", "slave", "private", "unbindable", "rshared", "rslave", "rprivate", "runbindable",
    ):
        raise _fail("linux.rootfsPropagation", f"unknown propagation {linux['rootfsPropagation']!r}")


def namespaces(doc: dict[str, Any]) -> dict[str, str | None]:
    """Namespace type -> path to join, or None to create a new one."""
    return {ns["type"]: ns.get("path") for ns in doc.get("linux", {}).get("namespaces", [])}


def rootfs_path(doc: dict[str, Any], bundle: str) -> str:
    path = doc["root"]["path"]
    return os.path.normpath(path if path.startswith("/") else os.path.join(bundle, path))
