"""cgroup v2 device control: OCI device rules compiled to a BPF_PROG_TYPE_CGROUP_DEVICE program.

The program reads ``struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor;}`` (access_type is
``access << 16 | type``) and returns 1 to allow, 0 to deny. OCI rules apply in order with the last match
winning, so the program tests them from last to first and returns on the first match; no match denies.
An allow rule matches when every requested access is in the rule; a deny rule when any of it is.
"""

from __future__ import annotations

import errno
import os
import struct

from clave.linux import ffi  # not ctypes: see that module
from clave.linux.cgroups.common import CgroupError

TYPE_CHECKING = False  # typing is not imported at run time: start-up latency matters
if TYPE_CHECKING:
    from typing import Any

# bpf(2) commands, program and attach types (include/uapi/linux/bpf.h)
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# instruction opcodes
_LDX_MEM_W = 0x61
_ALU64_AND_K = 0x57
_ALU64_RSH_K = 0x77
_ALU64_MOV_K = 0xB7
_ALU64_MOV_X = 0xBF
_JMP_JNE_K = 0x55
_JMP_JEQ_K = 0x15
_JMP_JNE_X = 0x5D
_JMP_EXIT = 0x95

# registers: r1 ctx (then scratch), r2 type, r3 access, r4 major, r5 minor
_R0, _R1, _R2, _R3, _R4, _R5 = range(6)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _access_mask(access: str) -> int:
    mask = 0
    for ch in access:
        mask |= {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}[ch]
    return mask


def build_program(rules: list[dict[str, Any]]) -> bytes:
    """The program's instructions for OCI ``linux.resources.devices`` rules."""
    prog = [
        _insn(_LDX_MEM_W, _R2, _R1, 0),
        _insn(_ALU64_AND_K, _R2, imm=0xFFFF),
        _insn(_LDX_MEM_W, _R3, _R1, 0),
        _insn(_ALU64_RSH_K, _R3, imm=16),
        _insn(_LDX_MEM_W, _R4, _R1, 4),
        _insn(_LDX_MEM_W, _R5, _R1, 8),
    ]
    for rule in reversed(rules):
        dev_type = rule.get("type") or "a"
        access = rule.get("access") or "rwm"
        if dev_type not in ("a", "b", "c") or set(access) - set("rwm"):
            raise CgroupError(f"devices: invalid rule {rule!r}")
        allow = bool(rule.get("allow"))
        major, minor = rule.get("major"), rule.get("minor")
        # each check is (instructions before the jump, jump template); offsets fixed once the block is known
        checks: list[list[tuple[int, int, int, int]]] = []
        if dev_type != "a":
            checks.append([(_JMP_JNE_K, _R2, 0, BPF_DEVCG_DEV_BLOCK if dev_type == "b" else BPF_DEVCG_DEV_CHAR)])
        mask = _access_mask(access)
        if mask != 7:
            if allow:  # requested & mask != requested -> no match
                checks.append([(_ALU64_MOV_X, _R1, _R3, 0), (_ALU64_AND_K, _R1, 0, mask), (_JMP_JNE_X, _R1, _R3, 0)])
            else:  # requested & mask == 0 -> no match
                checks.append([(_ALU64_MOV_X, _R1, _R3, 0), (_ALU64_AND_K, _R1, 0, mask), (_JMP_JEQ_K, _R1, 0, 0)])
        if major is not None and major != -1:
            checks.append([(_JMP_JNE_K, _R4, 0, int(major))])
        if minor is not None and minor != -1:
            checks.append([(_JMP_JNE_K, _R5, 0, int(minor))])
        block_len = sum(len(c) for c in checks) + 2
        emitted = 0
        for check in checks:
            for code, dst, src, imm in check:
                emitted += 1
                off = block_len - emitted if code in (_JMP_JNE_K, _JMP_JEQ_K, _JMP_JNE_X) else 0
                prog.append(_insn(code, dst, src, off, imm))
        prog.append(_insn(_ALU64_MOV_K, _R0, imm=1 if allow else 0))
        prog.append(_insn(_JMP_EXIT))
        if not checks:
            return b"".join(prog)  # matches everything: later code would be unreachable (the verifier refuses)
    prog.append(_insn(_ALU64_MOV_K, _R0, imm=0))
    prog.append(_insn(_JMP_EXIT))
    return b"".join(prog)


def _bpf(cmd: int, attr: ffi.Array[ffi.c_char], what: str) -> int:
    machine = os.uname().machine
    number = _SYS_BPF.get(machine)
    if number is None:
        raise CgroupError(f"devices: bpf() syscall number unknown on {machine}")
    result = ffi.libc().syscall(ffi.c_long(number), ffi.c_int(cmd), attr, ffi.c_uint(len(attr)))
    if result < 0:
        err = ffi.get_errno()
        raise OSError(err, f"devices: {what}: {os.strerror(err)}")
    return int(result)


def load_program(insns: bytes) -> int:
    """BPF_PROG_LOAD; returns the program fd. The verifier log goes into the error on refusal."""
    insn_buf = ffi.create_string_buffer(insns, len(insns))
    license_buf = ffi.create_string_buffer(b"Apache")
    log_buf = ffi.create_string_buffer(65536)
    attr = ffi.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // 8,
                     ffi.addressof(insn_buf), ffi.addressof(license_buf), 1, len(log_buf),
                     ffi.addressof(log_buf))
    try:
        return _bpf(BPF_PROG_LOAD, attr, "loading the device program")
    except OSError as exc:
        log = log_buf.value.decode(errors="replace").strip().splitlines()
        detail = f" ({log[-1]})" if log else ""
        raise CgroupError(f"{exc.strerror}{detail}") from None


def attached_program_ids(cgroup_fd: int) -> list[int]:
    ids = (ffi.c_uint32 * 64)()
    attr = ffi.create_string_buffer(128)
    struct.pack_into("<IIIIQI", attr, 0, cgroup_fd, BPF_CGROUP_DEVICE, 0, 0, ffi.addressof(ids), len(ids))
    _bpf(BPF_PROG_QUERY, attr, "querying attached device programs")
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[:count])


# Loaded programs of a long-lived caller (the guest agent, the shim), by pid and instructions: each load runs
# the kernel's verifier, tens of milliseconds under emulation, and most containers have the same rules.
_loaded: dict[tuple[int, bytes], int] = {}
_LOADED_MAX = 8


def _program_fd(insns: bytes) -> int:
    key = (os.getpid(), insns)  # a forked child's copy of the table is not its own
    fd = _loaded.get(key)
    if fd is None:
        fd = load_program(insns)
        if len(_loaded) >= _LOADED_MAX:
            evicted_key = next(iter(_loaded))
            if evicted_key[0] == key[0]:
                os.close(_loaded[evicted_key])
            del _loaded[evicted_key]
        _loaded[key] = fd
    return fd


def apply_device_rules(cgroup_dir: str, rules: list[dict[str, Any]]) -> None:
    """Attach a program for ``rules`` to a cgroup2 directory, replacing the programs attached before."""
    prog_fd = _program_fd(build_program(rules))
    try:
        cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"devices: cannot open {cgroup_dir}: {exc.strerror}") from None
    try:
        old_ids = attached_program_ids(cgroup_fd)
        attr = ffi.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        _bpf(BPF_PROG_ATTACH, attr, f"attaching the device program to {cgroup_dir}")
        for prog_id in old_ids:
            _detach_by_id(cgroup_fd, prog_id)
    except OSError as exc:
        raise CgroupError(exc.strerror or str(exc)) from None
    finally:
        os.close(cgroup_fd)


def _detach_by_id(cgroup_fd: int, prog_id: int) -> None:
    attr = ffi.create_string_buffer(128)
    struct.pack_into("<I", attr, 0, prog_id)
    try:
        old_fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr, "opening an old device program")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    try:
        attr = ffi.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, cgroup_fd, old_fd, BPF_CGROUP_DEVICE, 0)
        _bpf(BPF_PROG_DETACH, attr, "detaching an old device program")
    finally:
        os.close(old_fd)
