"""Linux capabilities from OCI `process.capabilities` (bounding, effective, inheritable, permitted, ambient).

runc's order, which callers changing user must follow:
    drop_bounding(caps["bounding"])      # PR_CAPBSET_DROP, needs CAP_SETPCAP: before giving anything up
    set_keepcaps(True)                   # keep the permitted set across setuid away from root
    setgroups / setresgid / setresuid    # done by the caller
    set_keepcaps(False)
    apply_sets(caps)                     # capset(2) v3, then the ambient set
Without a user change, `apply(caps)` does the two steps. Capabilities newer than the running kernel
(above /proc/sys/kernel/cap_last_cap) are skipped with a warning, as runc does; names nobody knows are errors.
"""

from __future__ import annotations

import os
import struct

from clave.linux import ffi  # not ctypes: see that module

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence


class CapabilityError(Exception):
    """A capability set that cannot be parsed or applied."""


CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

# prctl(2) options
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_SYS_CAPGET = {"x86_64": 125, "aarch64": 90}

def _syscall(*args: object) -> int:
    result: int = ffi.function("syscall", ffi.c_long)(*args)
    return result


def _prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    result = ffi.libc().prctl(option, ffi.c_ulong(arg2), ffi.c_ulong(arg3), ffi.c_ulong(0), ffi.c_ulong(0))
    if result < 0:
        err = ffi.get_errno()
        raise CapabilityError(f"{what}: {os.strerror(err)}")
    return int(result)


_last_cap: int | None = None


def last_cap() -> int:
    """The highest capability number the running kernel knows (/proc/sys/kernel/cap_last_cap)."""
    global _last_cap
    if _last_cap is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                _last_cap = int(f.read())
        except OSError:
            _last_cap = max(CAPABILITIES.values())
    return _last_cap


class CapabilitySets:
    """The five sets as bit masks, with the capabilities skipped because the kernel lacks them."""

    def __init__(self, masks: dict[str, int], skipped: list[str]) -> None:
        self.masks = masks
        self.skipped = skipped

    def __getitem__(self, name: str) -> int:
        return self.masks[name]


def parse(caps: Mapping[str, Sequence[str] | None]) -> CapabilitySets:
    """Validate OCI `process.capabilities` and turn it into masks; absent sets are empty, as in runc."""
    if not isinstance(caps, dict):
        raise CapabilityError("process.capabilities must be an object")
    top = last_cap()
    masks = {}
    skipped: list[str] = []
    for set_name in SETS:
        mask = 0
        for name in caps.get(set_name) or ():
            number = CAPABILITIES.get(name)
            if number is None:
                raise CapabilityError(f"unknown capability {name!r} in process.capabilities.{set_name}")
            if number > top:
                if name not in skipped:
                    skipped.append(name)
                continue
            mask |= 1 << number
        masks[set_name] = mask
    return CapabilitySets(masks, skipped)


def _as_sets(caps: Mapping[str, Sequence[str] | None] | CapabilitySets) -> CapabilitySets:
    return caps if isinstance(caps, CapabilitySets) else parse(caps)


def drop_bounding(keep: Iterable[str] | CapabilitySets) -> None:
    """Drop every capability not in `keep` (names, or parsed sets) from the bounding set."""
    if isinstance(keep, CapabilitySets):
        mask = keep["bounding"]
    else:
        mask = parse({"bounding": list(keep)})["bounding"]
    for number in range(last_cap() + 1):
        if not mask & (1 << number) and _prctl(PR_CAPBSET_READ, number, what="read the bounding set"):
            _prctl(PR_CAPBSET_DROP, number, what=f"drop {_name(number)} from the bounding set")


def set_keepcaps(keep: bool) -> None:
    """PR_SET_KEEPCAPS: keep the permitted set across a setuid away from uid 0."""
    _prctl(PR_SET_KEEPCAPS, int(keep), what="PR_SET_KEEPCAPS")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can no longer grant privileges (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) with _LINUX_CAPABILITY_VERSION_3 for the calling thread."""
    header = ffi.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    halves = []
    for shift in (0, 32):
        halves += [(effective >> shift) & 0xFFFFFFFF, (permitted >> shift) & 0xFFFFFFFF,
                   (inheritable >> shift) & 0xFFFFFFFF]
    data = ffi.create_string_buffer(struct.pack("=6I", *halves), 24)
    nr = _SYS_CAPSET[os.uname().machine]
    if _syscall(ffi.c_long(nr), header, data) < 0:
        err = ffi.get_errno()
        raise CapabilityError(f"capset: {os.strerror(err)} (a set asks for a capability the process lacks)")


def clear_inheritable() -> None:
    """Empty the inheritable and ambient sets, keeping effective and permitted: a container whose config
    names no capabilities must not inherit its caller's inheritable set (CVE-2022-29162)."""
    header = ffi.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ffi.create_string_buffer(24)
    if _syscall(ffi.c_long(_SYS_CAPGET[os.uname().machine]), header, data) < 0:
        raise CapabilityError(f"capget: {os.strerror(ffi.get_errno())}")
    eff0, perm0, _, eff1, perm1, _ = struct.unpack("=6I", data.raw)
    capset(eff0 | eff1 << 32, perm0 | perm1 << 32, 0)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clear the ambient set")


def apply_sets(caps: Mapping[str, Sequence[str] | None] | CapabilitySets) -> list[str]:
    """Set effective/permitted/inheritable, then the ambient set. Returns warnings (skipped capabilities, and
    ambient capabilities the kernel refused because they are not both permitted and inheritable)."""
    sets = _as_sets(caps)
    warnings = [f"capability {name} is not known to the running kernel: skipped" for name in sets.skipped]
    capset(sets["effective"], sets["permitted"], sets["inheritable"])
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clear the ambient set")
    ambient = sets["ambient"]
    for number in range(last_cap() + 1):
        if ambient & (1 << number):
            try:
                _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number, what="raise")
            except CapabilityError:
                # runc only warns: its default spec lists ambient capabilities that are not inheritable.
                warnings.append(f"cannot raise ambient {_name(number)}: it is not permitted and inheritable")
    return warnings


def apply(caps: Mapping[str, Sequence[str] | None] | CapabilitySets) -> list[str]:
    """Apply all five sets in place (no user change in between). Returns warnings, as apply_sets."""
    sets = _as_sets(caps)
    drop_bounding(sets)
    return apply_sets(sets)


def _name(number: int) -> str:
    for name, value in CAPABILITIES.items():
        if value == number:
            return name
    return f"capability {number}"


def current() -> dict[str, int]:
    """The calling process's masks from /proc/self/status: CapInh, CapPrm, CapEff, CapBnd, CapAmb."""
    masks = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, _, value = line.partition(":")
                masks[key] = int(value.strip(), 16)
    return masks


def names(mask: int) -> list[str]:
    """The capability names set in `mask`, in number order."""
    return [name for name, number in CAPABILITIES.items() if mask & (1 << number)]
