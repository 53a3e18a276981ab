"""Seccomp: compile an OCI `linux.seccomp` section to a classic BPF program and load it.

The container's init calls `apply()` right before execve, so this module imports only os, struct and clave.linux.ffi
(not typing, json or libseccomp). Call `compile_cached(config)` in the parent before forking the init: the
child inherits the cache and `apply()` there only loads the program (under a millisecond).

The program follows libseccomp's semantics as runc drives it:

- `seccomp_data.arch` selects a block per architecture; the native one is always present; an architecture
  outside the list gets libseccomp's "bad arch" action (SECCOMP_RET_KILL_THREAD). On x86_64 the x32 ABI shares
  the audit arch and is told apart by the x32 bit of the syscall number.
- Within a block a balanced binary search over syscall-number intervals picks the target (about log2 of the
  number of intervals comparisons), so Docker's default profile stays far below the 4096-instruction limit.
- Rules of one syscall are tried in order (ORed); the conditions of one rule are ANDed; 64-bit arguments are
  compared as high then low 32-bit halves (32-bit ABIs compare the low half only, as libseccomp does).
- i386 socket and SysV IPC calls also match through socketcall(2)/ipc(2), as libseccomp arranges it.
- Like runc, on the architectures the config lists, syscalls numbered above the highest one the profile names
  get ENOSYS instead of a denying default action, so libc falls back from syscalls newer than the profile.

tests/linux/test_seccomp_libseccomp.py checks decisions against libseccomp's own BPF for the same profiles.
"""

from __future__ import annotations

import os
import struct

from clave.linux import syscall_table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import on the container start path
    from typing import Any


class SeccompError(Exception):
    """A seccomp configuration that cannot be compiled or loaded."""


# seccomp(2) return actions.
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

EPERM = 1
ENOSYS = 38

# seccomp(2) operation and filter flags.
SECCOMP_SET_MODE_FILTER = 1
FILTER_FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
    "SECCOMP_FILTER_FLAG_NEW_LISTENER": 8,
    "SECCOMP_FILTER_FLAG_TSYNC_ESRCH": 16,
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 32,
}

# Audit architecture tokens (AUDIT_ARCH_*) and argument width per SCMP_ARCH_*.
_AUDIT_ARCH = {
    "SCMP_ARCH_X86_64": 0xC000003E,
    "SCMP_ARCH_X32": 0xC000003E,
    "SCMP_ARCH_X86": 0x40000003,
    "SCMP_ARCH_AARCH64": 0xC00000B7,
}
_ARGS_64BIT = {
    "SCMP_ARCH_X86_64": True, "SCMP_ARCH_X32": False, "SCMP_ARCH_X86": False, "SCMP_ARCH_AARCH64": True,
}
# Architectures libseccomp knows but Clave has no syscall table for: named here so the error says so.
_KNOWN_UNSUPPORTED = {
    "SCMP_ARCH_ARM", "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390", "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_LOONGARCH64", "SCMP_ARCH_M68K", "SCMP_ARCH_SH", "SCMP_ARCH_SHEB",
}
_NATIVE_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}

# classic BPF opcodes (linux/filter.h) used here.
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JA = 0x05
_JEQ_K = 0x15
_JGT_K = 0x25
_JGE_K = 0x35
_RET_K = 0x06
_MAX_INSNS = 4096
_MAX_SHORT_JUMP = 255

# struct seccomp_data offsets: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little-endian halves).
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARGS = 16

_INSN = struct.Struct("<HBBI")


def native_arch() -> str:
    machine = os.uname().machine
    try:
        return _NATIVE_ARCH[machine]
    except KeyError:
        raise SeccompError(f"seccomp: unsupported host architecture {machine}") from None


def action_value(action: str, errno_ret: int | None) -> int:
    """SECCOMP_RET_* of an OCI action; ERRNO and TRACE carry errnoRet (EPERM when unset, as in runc)."""
    data = EPERM if errno_ret is None else errno_ret
    if action in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        if not 0 <= data <= 0xFFFF:
            raise SeccompError(f"seccomp: errnoRet {data} out of range for {action}")
        return (RET_ERRNO if action == "SCMP_ACT_ERRNO" else RET_TRACE) | data
    simple = {
        "SCMP_ACT_KILL": RET_KILL_THREAD,
        "SCMP_ACT_KILL_THREAD": RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS": RET_KILL_PROCESS,
        "SCMP_ACT_TRAP": RET_TRAP,
        "SCMP_ACT_ALLOW": RET_ALLOW,
        "SCMP_ACT_LOG": RET_LOG,
        "SCMP_ACT_NOTIFY": RET_USER_NOTIF,
    }
    try:
        return simple[action]
    except KeyError:
        raise SeccompError(f"seccomp: unknown action {action!r}") from None


# ---------------------------------------------------------------------------------------------------------
# Rules


_OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ")

# (arg index, op, value, valueTwo)
_Cond = tuple[int, str, int, int]
# (action value, conditions); no conditions = the rule always matches.
_Rule = tuple[int, tuple[_Cond, ...]]


def _parse_conditions(args: list[dict[str, Any]] | None, where: str) -> tuple[_Cond, ...]:
    conds = []
    for arg in args or ():
        index = arg.get("index")
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise SeccompError(f"seccomp: {where}: argument index {index!r} not in 0..5")
        op = arg.get("op")
        if op not in _OPS:
            raise SeccompError(f"seccomp: {where}: unknown operator {op!r}")
        value = arg.get("value", 0)
        value_two = arg.get("valueTwo", 0)
        for name, number in (("value", value), ("valueTwo", value_two)):
            if not isinstance(number, int) or not 0 <= number < 1 << 64:
                raise SeccompError(f"seccomp: {where}: argument {name} {number!r} is not a u64")
        conds.append((index, op, value, value_two))
    return tuple(conds)


class _Profile:
    """The config parsed per architecture: syscall number -> ordered rules."""

    def __init__(self, seccomp: dict[str, Any]) -> None:
        default = seccomp.get("defaultAction")
        if default is None:
            raise SeccompError("seccomp: defaultAction is required")
        if default == "SCMP_ACT_NOTIFY":
            raise SeccompError("seccomp: SCMP_ACT_NOTIFY cannot be the default action (write must not block)")
        self.default = action_value(default, seccomp.get("defaultErrnoRet"))
        listed = seccomp.get("architectures") or []
        self.arches = _arch_list(listed)
        # runc adds its ENOSYS stub for the architectures the config lists, not for the implicit native one.
        self.stub_arches = set(listed)
        self.uses_notify = False
        # arch name -> {nr: [rules]}; rules kept in config order.
        self.rules: dict[str, dict[int, list[_Rule]]] = {arch: {} for arch in self.arches}
        # arch name -> highest syscall number the profile names (known to the table), for the ENOSYS stub.
        self.highest: dict[str, int] = {arch: -1 for arch in self.arches}
        for i, entry in enumerate(seccomp.get("syscalls") or []):
            self._add_entry(i, entry)

    def _add_entry(self, i: int, entry: dict[str, Any]) -> None:
        names = list(entry.get("names") or [])
        if entry.get("name"):
            names.append(entry["name"])  # pre-1.0 configs
        where = f"syscalls[{i}] ({','.join(names[:3])}{',...' if len(names) > 3 else ''})"
        action = entry.get("action")
        if action is None:
            raise SeccompError(f"seccomp: {where}: action is required")
        try:
            value = action_value(action, entry.get("errnoRet"))
        except SeccompError as err:
            raise SeccompError(f"{err} in {where}") from None
        if action == "SCMP_ACT_NOTIFY":
            if "write" in names:
                # the init reports the notify fd to its parent with write(2) after loading the filter
                raise SeccompError(f"seccomp: {where}: SCMP_ACT_NOTIFY cannot be used for write")
            self.uses_notify = True
        conds = _parse_conditions(entry.get("args"), where)
        indexes = [cond[0] for cond in conds]
        if len(set(indexes)) < len(indexes):
            # runc's rule: conditions on a repeated argument become one rule each (ORed), not one ANDed rule.
            for cond in conds:
                self._add_rule(names, value, (cond,))
        else:
            self._add_rule(names, value, conds)

    def _add_rule(self, names: list[str], value: int, conds: tuple[_Cond, ...]) -> None:
        rule = (value, conds)
        # Like runc, a rule whose action is the default action is left out (it still counts for the stub).
        redundant = value == self.default
        for arch in self.arches:
            table = syscall_table.TABLES[arch]
            rules = self.rules[arch]
            numbers = [nr for nr in map(table.get, names) if nr is not None]  # unknown names are skipped
            if numbers:
                self.highest[arch] = max(self.highest[arch], *numbers)
            if redundant:
                continue
            for nr in numbers:
                rules.setdefault(nr, []).append(rule)
            if arch == "SCMP_ARCH_X86":
                for name in names:
                    _add_multiplexed(rules, name, value, conds)


# i386 also reaches the socket and SysV IPC calls through socketcall(2) and ipc(2), whose first argument
# names the call. As libseccomp does, a rule for such a call also matches the multiplexer with that first
# argument: for socketcall the rule's own conditions are dropped (the arguments are in memory), for ipc they
# are kept with their indexes unchanged.
_SOCKETCALLS = {
    "socket": 1, "bind": 2, "connect": 3, "listen": 4, "accept": 5, "getsockname": 6, "getpeername": 7,
    "socketpair": 8, "send": 9, "recv": 10, "sendto": 11, "recvfrom": 12, "shutdown": 13, "setsockopt": 14,
    "getsockopt": 15, "sendmsg": 16, "recvmsg": 17, "accept4": 18, "recvmmsg": 19, "sendmmsg": 20,
}
_IPC_CALLS = {
    "semop": 1, "semget": 2, "semctl": 3, "semtimedop": 4, "msgsnd": 11, "msgrcv": 12, "msgget": 13,
    "msgctl": 14, "shmat": 21, "shmdt": 22, "shmget": 23, "shmctl": 24,
}


def _add_multiplexed(rules: dict[int, list[_Rule]], name: str, value: int, conds: tuple[_Cond, ...]) -> None:
    call = _SOCKETCALLS.get(name)
    if call is not None:
        selector: _Cond = (0, "SCMP_CMP_EQ", call, 0)
        rules.setdefault(syscall_table.I386["socketcall"], []).append((value, (selector,)))
        return
    call = _IPC_CALLS.get(name)
    if call is not None:
        selector = (0, "SCMP_CMP_EQ", call, 0)
        rules.setdefault(syscall_table.I386["ipc"], []).append((value, (selector, *conds)))


def _arch_list(names: Iterable[str]) -> list[str]:
    arches = [native_arch()]
    for name in names:
        if name in arches:
            continue
        if name not in syscall_table.TABLES:
            if name in _KNOWN_UNSUPPORTED:
                raise SeccompError(f"seccomp: architecture {name} is not supported by clave")
            raise SeccompError(f"seccomp: unknown architecture {name!r}")
        arches.append(name)
    return arches


# ---------------------------------------------------------------------------------------------------------
# Code generation. The program is emitted backwards (last instruction first) so that every jump target already
# has a position; a conditional jump farther than 255 instructions goes through a JA trampoline.


class _Emitter:
    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, int]] = []  # reversed: position p is forward index len-1-p
        self._rets: dict[int, int] = {}

    def _offset(self, target: int) -> int:
        return len(self.code) - target - 1

    def _near(self, target: int, slack: int = 2) -> int:
        """A position reachable by a short jump from the next instruction (allowing `slack` more to come)."""
        if self._offset(target) + slack <= _MAX_SHORT_JUMP:
            return target
        code, _, _, k = self.code[target]
        if code == _RET_K:
            return self.ret(k)
        return self._emit(_JA, 0, 0, self._offset(target))

    def _emit(self, code: int, jt: int, jf: int, k: int) -> int:
        self.code.append((code, jt, jf, k))
        return len(self.code) - 1

    def _follow(self, successor: int) -> None:
        """Make `successor` the instruction right after the next one emitted."""
        if successor != len(self.code) - 1:
            self._emit(_JA, 0, 0, self._offset(successor))

    def ret(self, value: int) -> int:
        pos = self._rets.get(value)
        if pos is not None and self._offset(pos) + 2 <= _MAX_SHORT_JUMP:
            return pos
        pos = self._emit(_RET_K, 0, 0, value)
        self._rets[value] = pos
        return pos

    def load(self, offset: int, successor: int) -> int:
        self._follow(successor)
        return self._emit(_LD_W_ABS, 0, 0, offset)

    def and_k(self, mask: int, successor: int) -> int:
        self._follow(successor)
        return self._emit(_ALU_AND_K, 0, 0, mask)

    def jump(self, code: int, k: int, on_true: int, on_false: int) -> int:
        if on_true == on_false:
            return on_true
        on_true = self._near(on_true, slack=2)
        on_false = self._near(on_false, slack=0)
        return self._emit(code, self._offset(on_true), self._offset(on_false), k)

    def program(self) -> bytes:
        pack = _INSN.pack
        return b"".join(pack(*insn) for insn in reversed(self.code))


def _emit_half(em: _Emitter, op: str, offset: int, value: int, mask: int, on_true: int, on_false: int) -> int:
    """Compare one 32-bit half: load it, mask it (MASKED_EQ) and branch."""
    if op == "MASKED_EQ" and mask == 0:
        return on_true if value == 0 else on_false  # (x & 0) == value: decided without looking at x
    if op == "EQ":
        test = em.jump(_JEQ_K, value, on_true, on_false)
    elif op == "GT":
        test = em.jump(_JGT_K, value, on_true, on_false)
    elif op == "GE":
        test = em.jump(_JGE_K, value, on_true, on_false)
    else:  # MASKED_EQ: like libseccomp, the datum is not masked (bits outside the mask never match)
        test = em.jump(_JEQ_K, value, on_true, on_false)
        if test == on_true:
            return test
        test = em.and_k(mask, test)
    if test in (on_true, on_false):
        return test
    return em.load(offset, test)


def _emit_condition(em: _Emitter, cond: _Cond, wide: bool, on_true: int, on_false: int) -> int:
    index, op, value, value_two = cond
    lo_off = _OFF_ARGS + 8 * index
    hi_off = lo_off + 4
    negate = op in ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE")
    if negate:  # NE = !EQ, LT = !GE, LE = !GT
        on_true, on_false = on_false, on_true
    kind = {"SCMP_CMP_NE": "EQ", "SCMP_CMP_LT": "GE", "SCMP_CMP_LE": "GT", "SCMP_CMP_EQ": "EQ",
            "SCMP_CMP_GE": "GE", "SCMP_CMP_GT": "GT", "SCMP_CMP_MASKED_EQ": "MASKED_EQ"}[op]
    if kind == "MASKED_EQ":
        mask, datum = value, value_two
    else:
        mask, datum = 0xFFFFFFFFFFFFFFFF, value
    lo_mask, hi_mask = mask & 0xFFFFFFFF, mask >> 32
    lo, hi = datum & 0xFFFFFFFF, datum >> 32
    low = _emit_half(em, kind, lo_off, lo, lo_mask, on_true, on_false)
    if not wide:
        return low
    if kind in ("EQ", "MASKED_EQ"):
        return _emit_half(em, kind, hi_off, hi, hi_mask, low, on_false)
    # GT/GE: high > hi decides true; high == hi falls to the low half; otherwise false.
    eq_hi = em.jump(_JEQ_K, hi, low, on_false)
    gt_hi = em.jump(_JGT_K, hi, on_true, eq_hi)
    return em.load(hi_off, gt_hi)


def _emit_rules(em: _Emitter, rules: list[_Rule], fallback: int, wide: bool) -> int:
    """Rules of one syscall: conditional rules in order, the first match wins, else `fallback`'s target."""
    target = fallback
    for value, conds in reversed(rules):
        matched = em.ret(value)
        rule_entry = matched
        for cond in reversed(conds):
            rule_entry = _emit_condition(em, cond, wide, rule_entry, target)
        target = rule_entry
    return target


def _syscall_targets(em: _Emitter, profile: _Profile, arch: str) -> dict[int, int]:
    """Emit the body of every syscall that has rules; return nr -> entry position."""
    wide = _ARGS_64BIT[arch]
    default = profile.default
    targets: dict[int, int] = {}
    # Positions of RETs per action: a leaf may point at a far one, jump() re-emits it close to the jump.
    rets: dict[int, int] = {}
    for nr, rules in profile.rules[arch].items():
        if len(rules) == 1 and not rules[0][1]:  # the common case: one unconditional rule
            value = rules[0][0]
            if value != default:
                pos = rets.get(value)
                targets[nr] = pos if pos is not None else rets.setdefault(value, em.ret(value))
            continue
        # Several unconditional rules: the first one in profile order wins, as in libseccomp (which runc and crun
        # use); podman's default profile both allows and refuses setns, sethostname, ... this way.
        unconditional = [value for value, conds in rules if not conds]
        conditional = [rule for rule in rules if rule[1]]
        fallback = unconditional[0] if unconditional else default
        if conditional:
            targets[nr] = _emit_rules(em, conditional, em.ret(fallback), wide)
        elif fallback != default:
            targets[nr] = em.ret(fallback)
    return targets


def _emit_search(em: _Emitter, bounds: list[int], leaves: list[int]) -> int:
    """Binary search over intervals [bounds[i], bounds[i+1]) of the accumulator (the syscall number)."""

    def build(lo: int, hi: int) -> int:
        if lo == hi:
            return leaves[lo]
        mid = (lo + hi + 1) // 2
        upper = build(mid, hi)
        lower = build(lo, mid - 1)
        return em.jump(_JGE_K, bounds[mid], upper, lower)

    return build(0, len(leaves) - 1)


def _intervals(
    points: dict[int, int], start: int, outside: int, tail_from: int | None = None, tail: int = 0
) -> tuple[list[int], list[int]]:
    """Split [start, ...) into intervals of equal target: numbers in `points` go to their target, the others
    to `outside`, and everything from `tail_from` on to `tail`. Returns the interval starts and targets."""
    bounds: list[int] = [start]
    leaves: list[int] = [outside]

    def step(at: int, target: int) -> None:
        if leaves[-1] == target:
            return
        if bounds[-1] == at:  # the current interval would be empty: retarget it, merging with the one before
            leaves[-1] = target
            if len(leaves) > 1 and leaves[-2] == target:
                bounds.pop()
                leaves.pop()
        else:
            bounds.append(at)
            leaves.append(target)

    run_start = run_end = -1
    run_target = outside
    for nr in sorted(points):
        target = points[nr]
        if nr == run_end + 1 and target == run_target:  # extends the current run of equal targets
            run_end = nr
            continue
        if run_start >= 0:
            step(run_start, run_target)
            step(run_end + 1, outside)
        run_start = run_end = nr
        run_target = target
    if run_start >= 0:
        step(run_start, run_target)
        step(run_end + 1, outside)
    if tail_from is not None:
        step(tail_from, tail)
    return bounds, leaves


def _arch_intervals(em: _Emitter, profile: _Profile, arch: str, start: int) -> tuple[list[int], list[int]]:
    targets = _syscall_targets(em, profile, arch)
    outside = em.ret(profile.default)
    highest = profile.highest[arch]
    allowing = profile.default in (RET_ALLOW, RET_LOG) or profile.default & 0xFFFF0000 == RET_TRACE
    if allowing or highest <= 0 or arch not in profile.stub_arches:
        return _intervals(targets, start, outside)
    # runc's stub: syscalls newer than any the profile names get ENOSYS, so libc falls back (clone3 -> clone).
    return _intervals(targets, start, outside, highest + 1, em.ret(RET_ERRNO | ENOSYS))


def _emit_arch_block(em: _Emitter, profile: _Profile, arches: list[str], bad_arch: int) -> int:
    """The block of one audit arch token: one architecture, or x86_64 and x32 split on the x32 bit."""
    if _AUDIT_ARCH[arches[0]] == _AUDIT_ARCH["SCMP_ARCH_X86_64"]:
        parts = [("SCMP_ARCH_X86_64", 0), ("SCMP_ARCH_X32", syscall_table.X32_SYSCALL_BIT)]
    else:
        parts = [(arches[0], 0)]
    bounds: list[int] = []
    leaves: list[int] = []
    for arch, start in parts:
        if arch in arches:
            part_bounds, part_leaves = _arch_intervals(em, profile, arch, start)
        else:
            # x86_64 and x32 share the audit arch: the ABI not in the filter is a bad arch, as in libseccomp.
            part_bounds, part_leaves = [start], [bad_arch]
        bounds += part_bounds
        leaves += part_leaves
    search = _emit_search(em, bounds, leaves)
    return em.load(_OFF_NR, search)


def compile_filter(seccomp: dict[str, Any]) -> bytes:
    """Compile an OCI `linux.seccomp` dict into a classic BPF program (an array of struct sock_filter)."""
    program, _ = _compile(seccomp)
    return program


def _compile(seccomp: dict[str, Any]) -> tuple[bytes, bool]:
    if not isinstance(seccomp, dict):
        raise SeccompError("seccomp: linux.seccomp must be an object")
    profile = _Profile(seccomp)
    em = _Emitter()
    bad_arch = em.ret(RET_KILL_THREAD)
    by_token: dict[int, list[str]] = {}
    for arch in profile.arches:
        by_token.setdefault(_AUDIT_ARCH[arch], []).append(arch)
    dispatch = bad_arch
    for token, arches in reversed(list(by_token.items())):
        block = _emit_arch_block(em, profile, arches, bad_arch)
        dispatch = em.jump(_JEQ_K, token, block, dispatch)
    em.load(_OFF_ARCH, dispatch)
    if len(em.code) > _MAX_INSNS:
        raise SeccompError(f"seccomp: filter needs {len(em.code)} instructions, the limit is {_MAX_INSNS}")
    return em.program(), profile.uses_notify


# ---------------------------------------------------------------------------------------------------------
# Loading

def _syscall() -> Any:
    from clave.linux import ffi  # not ctypes: see that module

    return ffi.function("syscall", ffi.c_long)


def load_filter(program: bytes, flags: Iterable[str] = (), listener: bool = False) -> int | None:
    """Install `program` on the calling thread with seccomp(SECCOMP_SET_MODE_FILTER).

    The caller must have set no_new_privs or hold CAP_SYS_ADMIN. With `listener` (or the NEW_LISTENER flag)
    the kernel's user-notification fd is returned; otherwise None.
    """
    if not program or len(program) % _INSN.size:
        raise SeccompError("seccomp: program is empty or not a whole number of instructions")
    count = len(program) // _INSN.size
    if count > _MAX_INSNS:
        raise SeccompError(f"seccomp: program has {count} instructions, the kernel allows {_MAX_INSNS}")
    bits = 0
    for flag in flags:
        try:
            bits |= FILTER_FLAGS[flag]
        except KeyError:
            raise SeccompError(f"seccomp: unknown filter flag {flag!r}") from None
    if listener:
        bits |= FILTER_FLAGS["SECCOMP_FILTER_FLAG_NEW_LISTENER"]
    listen = FILTER_FLAGS["SECCOMP_FILTER_FLAG_NEW_LISTENER"]
    if bits & listen and bits & FILTER_FLAGS["SECCOMP_FILTER_FLAG_TSYNC"]:
        # the kernel refuses TSYNC together with a listener unless TSYNC_ESRCH is set
        bits |= FILTER_FLAGS["SECCOMP_FILTER_FLAG_TSYNC_ESRCH"]
    from clave.linux import ffi

    buf = ffi.create_string_buffer(program, len(program))
    fprog = ffi.create_string_buffer(struct.pack("=HxxxxxxQ", count, ffi.addressof(buf)), 16)
    nr = _SYS_SECCOMP[os.uname().machine]
    result = _syscall()(ffi.c_long(nr), ffi.c_long(SECCOMP_SET_MODE_FILTER), ffi.c_long(bits), fprog)
    if result < 0:
        err = ffi.get_errno()
        hint = " (set no_new_privs or hold CAP_SYS_ADMIN first)" if err == 13 else ""
        raise SeccompError(f"seccomp: loading the filter failed: {os.strerror(err)}{hint}")
    if bits & listen:
        return int(result)
    if result > 0:  # TSYNC names the thread it could not synchronize
        raise SeccompError(f"seccomp: thread {result} could not be synchronized (SECCOMP_FILTER_FLAG_TSYNC)")
    return None


def evaluate(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Run a compiled filter on one system call (classic BPF, the instructions this compiler emits): the
    SECCOMP_RET_* value the kernel would return. Lets the runtime ask what a container's filter allows."""
    insns = [_INSN.unpack_from(program, off) for off in range(0, len(program), _INSN.size)]
    data = struct.pack("<iIQ6Q", nr if nr < 1 << 31 else nr - (1 << 32), arch, 0, *(list(args) + [0] * 6)[:6])
    acc = pc = 0
    for _ in range(len(insns) + 1):  # forward-only jumps: at most one visit per instruction
        if pc >= len(insns):
            break
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            if k % 4 or k + 4 > len(data):
                break
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x54:  # and #k
            acc &= k
            pc += 1
        elif code == 0x05:  # ja
            pc += 1 + k
        elif code in (0x15, 0x25, 0x35, 0x45):
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return int(k)
        else:
            raise SeccompError(f"seccomp: unexpected BPF opcode {code:#x} at {pc}")
    raise SeccompError("seccomp: the filter program does not terminate properly")


def allows(seccomp: dict[str, Any], calls: Iterable[tuple[str, tuple[int, ...]]]) -> bool:
    """Does the container's filter let each (syscall name, args) through on this host's architecture?"""

    program, _ = compile_cached(seccomp)
    arch = native_arch()
    table = syscall_table.TABLES[arch]
    for name, args in calls:
        if evaluate(program, table[name], _AUDIT_ARCH[arch], args) not in (RET_ALLOW, RET_LOG):
            return False
    return True


_cache: dict[str, tuple[bytes, bool]] = {}
# Compiled programs are cached on disk by content, so a container start rarely compiles at all.
CACHE_DIR = "/run/clave/seccomp"
_COMPILER_VERSION = b"clave-seccomp-1"  # bump when the compiler's output changes


def compile_cached(seccomp: dict[str, Any]) -> tuple[bytes, bool]:
    """(program, needs a listener), memoized in-process and on disk on the config's text."""
    from clave import fastjson

    text = fastjson.dumps(seccomp, compact=True)
    hit = _cache.get(text)
    if hit is None:
        hit = _cache[text] = _disk_cached(text, seccomp)
    return hit


def _disk_cached(text: str, seccomp: dict[str, Any]) -> tuple[bytes, bool]:
    try:
        from _sha256 import sha256
    except ImportError:  # pragma: no cover - other Python builds
        from hashlib import sha256
    digest = sha256(_COMPILER_VERSION + os.uname().machine.encode() + text.encode()).hexdigest()
    path = f"{CACHE_DIR}/{digest}.bpf"
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:1] in (b"0", b"1") and (len(data) - 1) % 8 == 0:
            return data[1:], data[:1] == b"1"
    except OSError:
        pass
    program, notify = _compile(seccomp)
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write((b"1" if notify else b"0") + program)
        os.rename(tmp, path)
    except OSError:
        pass  # a read-only /run only costs the compile next time
    return program, notify


def apply(seccomp: dict[str, Any]) -> int | None:
    """Compile and load `linux.seccomp`; returns the notify fd when any action is SCMP_ACT_NOTIFY."""
    program, uses_notify = compile_cached(seccomp)
    return load_filter(program, seccomp.get("flags") or (), listener=uses_notify)
