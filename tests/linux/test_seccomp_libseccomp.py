"""Differential tests against libseccomp (the library runc uses), through ctypes when libseccomp.so.2 is
installed (it is on Debian 12): the syscall tables agree, and for the same profile libseccomp's exported BPF
and Clave's return the same action for every syscall number, architecture and argument pattern tried."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from test_seccomp import run_bpf

from clave.linux import seccomp, syscall_table
from clave.linux.seccomp_default import DEFAULT_PROFILE

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="compares x86_64-host filters")

# libseccomp's SCMP_ARCH_* tokens (x32 differs from the audit arch the kernel reports)
TOKENS = {
    "SCMP_ARCH_X86_64": 0xC000003E,
    "SCMP_ARCH_X86": 0x40000003,
    "SCMP_ARCH_X32": 0x4000003E,
    "SCMP_ARCH_AARCH64": 0xC00000B7,
}
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
AUDIT_X86_64, AUDIT_I386 = 0xC000003E, 0x40000003


@pytest.fixture(scope="module")
def libseccomp() -> Any:
    path = ctypes.util.find_library("seccomp")
    if path is None:
        pytest.skip("libseccomp is not installed")
    lib = ctypes.CDLL(path)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # malloc'd char *
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def libseccomp_program(lib: Any, config: dict[str, Any]) -> tuple[bytes, set[str]]:
    """libseccomp's BPF for `config` (as runc builds it) and the names libseccomp does not know."""
    ctx = lib.seccomp_init(seccomp.action_value(config["defaultAction"], config.get("defaultErrnoRet")))
    for arch in config.get("architectures", []):
        if arch != "SCMP_ARCH_X86_64":
            assert lib.seccomp_arch_add(ctx, TOKENS[arch]) == 0
    unknown = set()
    for entry in config["syscalls"]:
        action = seccomp.action_value(entry["action"], entry.get("errnoRet"))
        args = entry.get("args") or []
        conds = b"".join(
            struct.pack("=IIQQ", a["index"], OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
            for a in args
        )
        for name in entry["names"]:
            nr = lib.seccomp_syscall_resolve_name_arch(0, name.encode())
            if nr == -1:  # __NR_SCMP_ERROR: runc skips names libseccomp does not know
                unknown.add(name)
                continue
            assert lib.seccomp_rule_add_array(ctx, action, nr, len(args), conds or None) == 0, name
    read_end, write_end = os.pipe()
    assert lib.seccomp_export_bpf(ctx, write_end) == 0
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    lib.seccomp_release(ctx)
    return b"".join(chunks), unknown


@pytest.mark.parametrize("arch", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"])
def test_syscall_tables_agree(libseccomp: Any, arch: str) -> None:
    table = syscall_table.TABLES[arch]
    base = syscall_table.X32_SYSCALL_BIT if arch == "SCMP_ARCH_X32" else 0
    compared = 0
    for nr in range(base, base + 560):
        pointer = libseccomp.seccomp_syscall_resolve_num_arch(TOKENS[arch], nr)
        if not pointer:
            continue
        name = ctypes.string_at(pointer).decode()
        ctypes.CDLL(None).free(ctypes.c_void_p(pointer))
        assert table.get(name) == nr, (arch, name, nr)
        compared += 1
    assert compared > 300


def _compare(
    lib: Any, config: dict[str, Any], arg_patterns: Sequence[tuple[int, ...]], focus: set[str]
) -> int:
    """Compare decisions for every number of every x86 ABI; syscalls named in `focus` (those with argument
    rules) with every argument pattern, the others with the first."""
    focus_nrs = {
        t[n] for t in (syscall_table.X86_64, syscall_table.I386, syscall_table.X32) for n in focus if n in t
    }
    ours = seccomp.compile_filter(config)
    theirs, unknown = libseccomp_program(lib, config)
    highest = {
        arch: max((t[n] for e in config["syscalls"] for n in e["names"] if n in t), default=-1)
        for arch, t in (
            ("x86_64", syscall_table.X86_64),
            ("i386", syscall_table.I386),
            ("x32", syscall_table.X32),
        )
    }
    skip = (
        {syscall_table.X86_64.get(n) for n in unknown}
        | {syscall_table.I386.get(n) for n in unknown}
        | {syscall_table.X32.get(n) for n in unknown}
    )
    checked = 0
    for arch, audit, base in (
        ("x86_64", AUDIT_X86_64, 0),
        ("i386", AUDIT_I386, 0),
        ("x32", AUDIT_X86_64, syscall_table.X32_SYSCALL_BIT),
    ):
        for nr in range(base, base + 560):
            if nr in skip:
                continue
            for args in arg_patterns if nr in focus_nrs else arg_patterns[:1]:
                mine = run_bpf(ours, nr, audit, args)
                if nr > highest[arch] and mine == seccomp.RET_ERRNO | seccomp.ENOSYS:
                    continue  # runc's ENOSYS stub, added on top of libseccomp's program
                assert mine == run_bpf(theirs, nr, audit, args), (arch, nr, [hex(a) for a in args])
                checked += 1
    return checked


def test_default_profile_decides_like_libseccomp(libseccomp: Any) -> None:
    patterns = [
        (0,),
        (8,),
        (0x20008,),
        (0xFFFFFFFF,),
        (0x1FFFFFFFF,),
        (0x00020000 | 17,),
        (0x01200011,),
        (40,),
        (2,),
    ]
    assert _compare(libseccomp, DEFAULT_PROFILE, patterns, {"personality", "clone", "socket"}) > 1500


def test_argument_rules_decide_like_libseccomp(libseccomp: Any) -> None:
    values = [0, 5, 0xFFFFFFFF, 0x100000000, 0x100000005, 0xFFFFFFFF00000000]
    rules: list[dict[str, Any]] = []
    names = ["lseek", "mmap", "kill", "openat", "fcntl", "ioctl", "prctl"]
    for i, op in enumerate(OPS):
        rules.append(
            {
                "names": [names[i]],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 10 + i,
                "args": [
                    {
                        "index": 1,
                        "value": 0x100000005 if op != "SCMP_CMP_MASKED_EQ" else 0xF0000000F,
                        "valueTwo": 0x100000005,
                        "op": op,
                    }
                ],
            }
        )
    both = [{"index": 0, "value": 3, "op": "SCMP_CMP_EQ"}, {"index": 2, "value": 1, "op": "SCMP_CMP_GE"}]
    rules.append({"names": ["lseek"], "action": "SCMP_ACT_TRAP", "args": both})
    config = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    }
    patterns = [(fd, value, whence) for fd in (3, 4) for value in values for whence in (0, 2)]
    assert _compare(libseccomp, config, patterns, set(names)) > 1600


def test_i386_socketcall_and_ipc_multiplexers_decide_like_libseccomp(libseccomp: Any) -> None:
    config = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86"],
        "syscalls": [
            {
                "names": ["socket", "bind", "send", "recvmmsg"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}],
            },
            {"names": ["connect", "semget"], "action": "SCMP_ACT_ERRNO", "errnoRet": 5},
            {
                "names": ["shmctl", "msgrcv"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 1, "value": 5, "op": "SCMP_CMP_EQ"}],
            },
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        ],
    }
    patterns = [(call, second, 0) for call in range(26) for second in (0, 5, 40)] + [(40, 0, 5)]
    focus = {"socketcall", "ipc", "socket", "bind", "recvmmsg", "connect", "semget", "shmctl", "msgrcv"}
    assert _compare(libseccomp, config, patterns, focus) > 1500
    program = seccomp.compile_filter(config)
    socketcall, ipc = syscall_table.I386["socketcall"], syscall_table.I386["ipc"]
    assert run_bpf(program, socketcall, AUDIT_I386, (1, 40)) == seccomp.RET_ALLOW  # conditions dropped
    assert run_bpf(program, socketcall, AUDIT_I386, (3,)) == seccomp.RET_ERRNO | 5
    assert run_bpf(program, ipc, AUDIT_I386, (24, 5)) == seccomp.RET_ALLOW  # index kept, as libseccomp
    assert run_bpf(program, ipc, AUDIT_I386, (24, 0, 5)) == seccomp.RET_ERRNO | 1
