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


# Bounds every value of a config must respect wherever it is (see _check_values).
MAX_NESTING = 64  # real configs nest about 6 deep (seccomp argument rules); the state file nests the config
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
MAX_HOOK_TIMEOUT = 2147483647  # seconds (68 years): any longer cannot be waited for
MAX_CONSOLE_SIZE = 65535  # struct winsize holds unsigned shorts
MAX_UMASK = 0o7777


class ConfigError(Exception):
    """config.json is missing, unparsable or invalid. One line."""


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"config.json: {path}: {message}")


def _show(value: Any, limit: int = 60) -> str:
    """A value from the config quoted for an error line: escaped, and cut short if long."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _key(path: str, key: str) -> str:
    shown = key if key.isprintable() and len(key) <= 60 else _show(key)
    return f"{path}.{shown}" if path else shown


def _check_text(text: str, path: str) -> None:
    # Strings reach the kernel (paths, argv, env, hostname...) as C strings, which end at NUL; and they are
    # encoded as UTF-8, which has no lone surrogates (JSON's "\ud800" escape can still spell one).
    if "\0" in text:
        raise _fail(path, "must not contain a NUL character")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise _fail(path, "must be valid Unicode text (it contains a lone surrogate)") from None


def _check_values(doc: Any, root: str = "") -> None:
    """Rules for every value, known field or extension: strings are kernel-safe text, integers fit 64 bits (as
    any field of runc's Go types must), numbers are finite, and the document is not absurdly deep. Walked
    with an explicit stack, so no depth reaches Python's recursion limit."""
    stack: list[tuple[Any, str, int]] = [(doc, root, 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path or "(top level)")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= UINT64_MAX:
                raise _fail(path or "(top level)", "number out of range (more than 64 bits)")
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise _fail(path or "(top level)", "must be a finite number")
        elif isinstance(value, dict | list):
            if depth >= MAX_NESTING:
                raise _fail(path or "(top level)", f"nested more than {MAX_NESTING} levels deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, _key(path, "(key)") if not key else _key(path, key))
                    stack.append((item, _key(path, key), depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _int_in(value: Any, path: str, low: int, high: int) -> int:
    _expect(value, int, path, "an integer")
    if not low <= value <= high:
        raise _fail(path, f"must be between {low} and {high} (got {value})")
    return value


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


def _uint(value: Any, path: str, high: int = UINT64_MAX) -> int:
    _expect(value, int, path, "an integer")
    if value < 0:
        raise _fail(path, "must not be negative")
    if value > high:
        raise _fail(path, f"must be at most {high} (got {value})")
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
    doc = read_document(path, f"config.json not found in bundle {bundle}")
    validate(doc)
    return doc


def read_document(path: str, missing: str = "") -> Any:
    """The JSON of a config file, not validated (for callers that only route on it, such as the shim's
    start, which reads the annotations on every container start)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(missing or f"{path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return fastjson.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"config.json: invalid JSON: {exc}") from None


def bundle_annotations(bundle: str) -> dict[str, Any]:
    """The annotations of a bundle's config.json, or {} when it has none or cannot be read."""
    try:
        doc = read_document(os.path.join(bundle, "config.json"))
    except ConfigError:
        return {}
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    return annotations if isinstance(annotations, dict) else {}


def validate(doc: Any) -> None:
    _expect(doc, dict, "(top level)", "a JSON object")
    _check_values(doc)
    version = _expect(doc.get("ociVersion"), str, "ociVersion", "a string (required)")
    if not version.startswith(SUPPORTED_OCI_MAJOR):
        raise _fail("ociVersion", f"unsupported version {_show(version)} (clave supports 1.x)")
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
        _expect(process, dict, "process", "an object")
        _check_values(process, "process")
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
        raise _fail(f"{path}.cwd", f"must be an absolute path, got {_show(cwd)}")
    if "env" in process:
        _str_list(process["env"], f"{path}.env")
    if "terminal" in process:
        _expect(process["terminal"], bool, f"{path}.terminal", "a boolean")
    user = _expect(process.get("user", {}), dict, f"{path}.user", "an object")
    for key in ("uid", "gid"):
        if key in user:
            check_id(user[key], f"{path}.user.{key}")
    if "umask" in user:
        _uint(user["umask"], f"{path}.user.umask", MAX_UMASK)
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
        _uint(size.get("height", 0), f"{path}.consoleSize.height", MAX_CONSOLE_SIZE)
        _uint(size.get("width", 0), f"{path}.consoleSize.width", MAX_CONSOLE_SIZE)


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
        raise _fail(f"{path}.path", f"must be an absolute path, got {_show(hook_path)}")
    for key in ("args", "env"):
        if key in hook:
            _str_list(hook[key], f"{path}.{key}")
    if "timeout" in hook:
        timeout = _expect(hook["timeout"], int, f"{path}.timeout", "an integer")
        if timeout <= 0:
            raise _fail(f"{path}.timeout", "must be greater than zero")
        if timeout > MAX_HOOK_TIMEOUT:
            raise _fail(f"{path}.timeout", f"must be at most {MAX_HOOK_TIMEOUT} seconds (got {timeout})")


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
            raise _fail(f"linux.namespaces[{i}].type", f"unknown namespace type {_show(ns_type)}")
        if ns_type in seen:
            raise _fail(f"linux.namespaces[{i}]", f"duplicate namespace {_show(ns_type)}")
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
            _uint(dev.get("major"), f"linux.devices[{i}].major", UINT32_MAX)
            _uint(dev.get("minor"), f"linux.devices[{i}].minor", UINT32_MAX)
        if "fileMode" in dev:
            _uint(dev["fileMode"], f"linux.devices[{i}].fileMode", 0o7777)
        for key in ("uid", "gid"):
            if key in dev:
                check_id(dev[key], f"linux.devices[{i}].{key}")
    sysctl = _expect(linux.get("sysctl", {}), dict, "linux.sysctl", "an object")
    for key, value in sysctl.items():
        _expect(value, str, f"linux.sysctl.{key}", "a string")
    if "cgroupsPath" in linux:
        _expect(linux["cgroupsPath"], str, "linux.cgroupsPath", "a string")
    if "resources" in linux:
        _validate_resources(linux["resources"], "linux.resources")
    for key in ("maskedPaths", "readonlyPaths"):
        if key in linux:
            _str_list(linux[key], f"linux.{key}")
    if "seccomp" in linux:
        _validate_seccomp(linux["seccomp"], "linux.seccomp")
    if "personality" in linux:
        personality = _expect(linux["personality"], dict, "linux.personality", "an object")
        _expect(personality.get("domain"), str, "linux.personality.domain", "a string (required)")
        if "flags" in personality:
            _str_list(personality["flags"], "linux.personality.flags")
    for key in ("mountLabel", "intelRdt"):
        if key in linux:
            _expect(linux[key], str if key == "mountLabel" else dict, f"linux.{key}",
                    "a string" if key == "mountLabel" else "an object")
    if "rootfsPropagation" in linux and linux["rootfsPropagation"] not in (
        "shared", "slave", "private", "unbindable", "rshared", "rslave", "rprivate", "runbindable",
    ):
        raise _fail("linux.rootfsPropagation", f"unknown propagation {_show(linux['rootfsPropagation'])}")


def namespaces(doc: dict[str, Any]) -> dict[str, str | None]:
    """Namespace type -> path to join, or None to create a new one."""
    return {ns["type"]: ns.get("path") for ns in doc.get("linux", {}).get("namespaces", [])}


def rootfs_path(doc: dict[str, Any], bundle: str) -> str:
    path = doc["root"]["path"]
    return os.path.normpath(path if path.startswith("/") else os.path.join(bundle, path))


def validate_resources(resources: Any, source: str) -> None:
    """New resources for a live container (``update``), checked as config.json's linux.resources is; errors
    name ``source``."""
    try:
        _expect(resources, dict, "resources", "a JSON object (OCI linux.resources)")
        _check_values(resources, "resources")
        _validate_resources(resources, "resources")
    except ConfigError as exc:
        raise ConfigError(source + str(exc).removeprefix("config.json")) from None


# linux.resources: section -> field -> (kind, low, high), from the runtime-spec's Go types (int64, uint64,
# uint16...); a value outside them cannot be written to a cgroup file any runtime would accept.
_I64 = ("int", INT64_MIN, INT64_MAX)
_U64 = ("int", 0, UINT64_MAX)
_U32 = ("int", 0, UINT32_MAX)
_U16 = ("int", 0, 65535)
_BOOL = ("bool", 0, 0)
_STR = ("str", 0, 0)
_RESOURCE_FIELDS: dict[str, dict[str, tuple[str, int, int]]] = {
    "memory": {"limit": _I64, "reservation": _I64, "swap": _I64, "kernel": _I64, "kernelTCP": _I64,
               "swappiness": _U64, "disableOOMKiller": _BOOL, "useHierarchy": _BOOL, "checkBeforeUpdate": _BOOL},
    "cpu": {"shares": _U64, "quota": _I64, "burst": _U64, "period": _U64, "realtimeRuntime": _I64,
            "realtimePeriod": _U64, "cpus": _STR, "mems": _STR, "idle": _I64},
    "pids": {"limit": _I64},
    "blockIO": {"weight": _U16, "leafWeight": _U16},
    "network": {"classID": _U32},
}
_DEVICE_LISTS = {  # blockIO lists of per-device rules: the extra field each entry carries
    "weightDevice": ("weight", _U16), "throttleReadBpsDevice": ("rate", _U64),
    "throttleWriteBpsDevice": ("rate", _U64), "throttleReadIOPSDevice": ("rate", _U64),
    "throttleWriteIOPSDevice": ("rate", _U64),
}


def _field(value: Any, path: str, kind: tuple[str, int, int]) -> None:
    if kind[0] == "int":
        _int_in(value, path, kind[1], kind[2])
    elif kind[0] == "bool":
        _expect(value, bool, path, "a boolean")
    else:
        _expect(value, str, path, "a string")


def _validate_resources(resources: Any, path: str) -> None:
    _expect(resources, dict, path, "an object")
    for section, fields in _RESOURCE_FIELDS.items():
        if resources.get(section) is None:
            continue
        block = _expect(resources[section], dict, f"{path}.{section}", "an object")
        for key, kind in fields.items():
            if block.get(key) is not None:
                _field(block[key], f"{path}.{section}.{key}", kind)
    block_io = resources.get("blockIO") or {}
    for name, (extra, kind) in _DEVICE_LISTS.items():
        for i, rule in enumerate(_expect(block_io.get(name) or [], list, f"{path}.blockIO.{name}", "an array")):
            where = f"{path}.blockIO.{name}[{i}]"
            _expect(rule, dict, where, "an object")
            _int_in(rule.get("major"), f"{where}.major", 0, UINT32_MAX)
            _int_in(rule.get("minor"), f"{where}.minor", 0, UINT32_MAX)
            if rule.get(extra) is not None:
                _field(rule[extra], f"{where}.{extra}", kind)
            if name == "weightDevice" and rule.get("leafWeight") is not None:
                _field(rule["leafWeight"], f"{where}.leafWeight", _U16)
    for i, rule in enumerate(_expect(resources.get("devices") or [], list, f"{path}.devices", "an array")):
        where = f"{path}.devices[{i}]"
        _expect(rule, dict, where, "an object")
        _expect(rule.get("allow"), bool, f"{where}.allow", "a boolean (required)")
        for key in ("type", "access"):
            if rule.get(key) is not None:
                _expect(rule[key], str, f"{where}.{key}", "a string")
        for key in ("major", "minor"):
            if rule.get(key) is not None:
                _int_in(rule[key], f"{where}.{key}", -1, UINT32_MAX)  # -1: any
    for i, limit in enumerate(_expect(resources.get("hugepageLimits") or [], list, f"{path}.hugepageLimits",
                                      "an array")):
        where = f"{path}.hugepageLimits[{i}]"
        _expect(limit, dict, where, "an object")
        _expect(limit.get("pageSize"), str, f"{where}.pageSize", "a string (required)")
        _int_in(limit.get("limit"), f"{where}.limit", 0, UINT64_MAX)
    network = resources.get("network") or {}
    for i, prio in enumerate(_expect(network.get("priorities") or [], list, f"{path}.network.priorities",
                                     "an array")):
        where = f"{path}.network.priorities[{i}]"
        _expect(prio, dict, where, "an object")
        _expect(prio.get("name"), str, f"{where}.name", "a string (required)")
        _int_in(prio.get("priority"), f"{where}.priority", 0, UINT32_MAX)
    unified = _expect(resources.get("unified") or {}, dict, f"{path}.unified", "an object")
    for key, value in unified.items():
        _expect(value, str, _key(f"{path}.unified", key), "a string")


def _validate_seccomp(seccomp: Any, path: str) -> None:
    """The shapes the seccomp compiler reads; it checks the names (actions, syscalls, operators) itself."""
    _expect(seccomp, dict, path, "an object")
    if "defaultAction" in seccomp:
        _expect(seccomp["defaultAction"], str, f"{path}.defaultAction", "a string")
    if "defaultErrnoRet" in seccomp:
        _uint(seccomp["defaultErrnoRet"], f"{path}.defaultErrnoRet", UINT32_MAX)
    for key in ("architectures", "flags"):
        if key in seccomp:
            _str_list(seccomp[key], f"{path}.{key}")
    for key in ("listenerPath", "listenerMetadata"):
        if key in seccomp:
            _expect(seccomp[key], str, f"{path}.{key}", "a string")
    for i, rule in enumerate(_expect(seccomp.get("syscalls", []), list, f"{path}.syscalls", "an array")):
        where = f"{path}.syscalls[{i}]"
        _expect(rule, dict, where, "an object")
        _str_list(rule.get("names"), f"{where}.names")
        _expect(rule.get("action"), str, f"{where}.action", "a string (required)")
        if "errnoRet" in rule:
            _uint(rule["errnoRet"], f"{where}.errnoRet", UINT32_MAX)
        for j, arg in enumerate(_expect(rule.get("args", []), list, f"{where}.args", "an array")):
            _expect(arg, dict, f"{where}.args[{j}]", "an object")
            _int_in(arg.get("index"), f"{where}.args[{j}].index", 0, 5)
            _uint(arg.get("value", 0), f"{where}.args[{j}].value")
            _uint(arg.get("valueTwo", 0), f"{where}.args[{j}].valueTwo")
            _expect(arg.get("op"), str, f"{where}.args[{j}].op", "a string (required)")
