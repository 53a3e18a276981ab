"""Seccomp: the compiled BPF checked by an interpreter (every arch and comparison), and real filters loaded in
forked children to check what the kernel does with them."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import pytest
from forkchild import run_in_child

from clave.linux import seccomp, syscall_table
from clave.linux.capabilities import set_no_new_privs
from clave.linux.seccomp_default import DEFAULT_PROFILE, default_profile

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers below are x86_64")

AUDIT_X86_64 = 0xC000003E
AUDIT_I386 = 0x40000003
AUDIT_AARCH64 = 0xC00000B7
X32 = syscall_table.X32_SYSCALL_BIT
NR = syscall_table.X86_64
ALLOW, KILL_THREAD, KILL_PROCESS = seccomp.RET_ALLOW, seccomp.RET_KILL_THREAD, seccomp.RET_KILL_PROCESS


def errno_ret(code: int) -> int:
    return seccomp.RET_ERRNO | code


# ---------------------------------------------------------------------------------------------------------
# The compiled BPF run by the runtime's own interpreter (seccomp.evaluate), with the kernel verifier's basic
# checks on top.


def run_bpf(program: bytes, nr: int, arch: int = AUDIT_X86_64, args: tuple[int, ...] = ()) -> int:
    assert 0 < len(program) // 8 <= 4096 and len(program) % 8 == 0
    return seccomp.evaluate(program, nr, arch, args)


def compile_(syscalls: list[dict[str, Any]], default: str = "SCMP_ACT_ALLOW", **extra: Any) -> bytes:
    return seccomp.compile_filter({"defaultAction": default, "syscalls": syscalls, **extra})


# ---------------------------------------------------------------------------------------------------------
# Compiler semantics (interpreter)


def test_actions_and_errno_defaults() -> None:
    program = compile_(
        [
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["chdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
            {"names": ["uname"], "action": "SCMP_ACT_KILL"},
            {"names": ["getpid"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["gettid"], "action": "SCMP_ACT_KILL_THREAD"},
            {"names": ["mkdir"], "action": "SCMP_ACT_TRAP"},
            {"names": ["rmdir"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
            {"names": ["umask"], "action": "SCMP_ACT_LOG"},
            {"names": ["sync"], "action": "SCMP_ACT_NOTIFY"},
        ],
        default="SCMP_ACT_ERRNO",
        defaultErrnoRet=errno.ENOTTY,
    )
    assert run_bpf(program, NR["getcwd"]) == errno_ret(errno.EPERM)
    assert run_bpf(program, NR["chdir"]) == errno_ret(errno.EXDEV)
    assert run_bpf(program, NR["uname"]) == KILL_THREAD
    assert run_bpf(program, NR["getpid"]) == KILL_PROCESS
    assert run_bpf(program, NR["gettid"]) == KILL_THREAD
    assert run_bpf(program, NR["mkdir"]) == seccomp.RET_TRAP
    assert run_bpf(program, NR["rmdir"]) == seccomp.RET_TRACE | 7
    assert run_bpf(program, NR["umask"]) == seccomp.RET_LOG
    assert run_bpf(program, NR["sync"]) == seccomp.RET_USER_NOTIF
    assert run_bpf(program, NR["read"]) == errno_ret(errno.ENOTTY)  # default action


def test_numbers_above_the_profile_get_enosys_like_runc() -> None:
    rules = [{"names": ["read", "mkdir"], "action": "SCMP_ACT_ALLOW"}]
    program = compile_(rules, default="SCMP_ACT_ERRNO", architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"])
    assert run_bpf(program, NR["read"]) == ALLOW
    assert run_bpf(program, NR["write"]) == errno_ret(errno.EPERM)  # below the highest named: default
    assert run_bpf(program, NR["mkdir"] + 1) == errno_ret(errno.ENOSYS)
    assert run_bpf(program, X32 - 1) == errno_ret(errno.ENOSYS)
    assert run_bpf(program, 0xFFFFFFFF) == KILL_THREAD  # has the x32 bit and x32 is not listed: bad arch
    assert run_bpf(program, syscall_table.I386["mkdir"] + 1, AUDIT_I386) == errno_ret(errno.ENOSYS)
    # As in runc: no stub for the implicit native architecture, nor when the default action allows.
    assert run_bpf(compile_(rules, default="SCMP_ACT_ERRNO"), NR["mkdir"] + 1) == errno_ret(errno.EPERM)
    for allowing in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE"):
        other = compile_(
            [{"names": ["mkdir"], "action": "SCMP_ACT_KILL"}],
            default=allowing,
            architectures=["SCMP_ARCH_X86_64"],
        )
        assert run_bpf(other, NR["mkdir"] + 1) == seccomp.action_value(allowing, None)


def test_first_of_conflicting_unconditional_rules_wins() -> None:
    """As in libseccomp (runc, crun): podman's default profile allows setns and then refuses it."""
    program = compile_([{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"},
                        {"names": ["getcwd"], "action": "SCMP_ACT_KILL"}])
    assert run_bpf(program, NR["getcwd"]) == errno_ret(errno.EPERM)


def test_unknown_names_are_skipped_and_unknown_fields_are_errors() -> None:
    program = compile_([{"names": ["no_such_syscall", "getcwd"], "action": "SCMP_ACT_ERRNO"}])
    assert run_bpf(program, NR["getcwd"]) == errno_ret(errno.EPERM)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"defaultAction": "SCMP_ACT_FOO"}, "SCMP_ACT_FOO"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}, "SCMP_ARCH_VAX"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_PPC64LE"]}, "not supported"),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOPE"}]},
            "SCMP_ACT_NOPE",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_XX"}],
                    },
                ],
            },
            "SCMP_CMP_XX",
        ),
        (
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}],
                    },
                ],
            },
            "index 6",
        ),
        ({"syscalls": []}, "defaultAction"),
    ]
    for config, needle in bad:
        with pytest.raises(seccomp.SeccompError, match=needle) as info:
            seccomp.compile_filter(config)
        assert "\n" not in str(info.value)
    with pytest.raises(seccomp.SeccompError, match="SECCOMP_FILTER_FLAG_BOGUS"):
        seccomp.load_filter(compile_([]), ["SECCOMP_FILTER_FLAG_BOGUS"])


def _reference(op: str, arg: int, value: int, value_two: int) -> bool:
    return {
        "SCMP_CMP_EQ": arg == value,
        "SCMP_CMP_NE": arg != value,
        "SCMP_CMP_LT": arg < value,
        "SCMP_CMP_LE": arg <= value,
        "SCMP_CMP_GT": arg > value,
        "SCMP_CMP_GE": arg >= value,
        "SCMP_CMP_MASKED_EQ": arg & value == value_two,
    }[op]


@pytest.mark.parametrize(
    "op",
    [
        "SCMP_CMP_EQ",
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_GT",
        "SCMP_CMP_GE",
        "SCMP_CMP_MASKED_EQ",
    ],
)
def test_64bit_comparisons_match_unsigned_arithmetic(op: str) -> None:
    rng = random.Random(op)
    edges = [0, 1, 0xFFFFFFFF, 0x100000000, 0x100000001, 0xFFFFFFFF00000000, (1 << 64) - 1, 0x80000000]
    values = edges + [rng.getrandbits(64) for _ in range(6)]
    for n, value in enumerate(values):
        # valueTwo (MASKED_EQ's datum) mostly inside the mask, sometimes with bits outside it (never matches)
        value_two = value & rng.getrandbits(64) if n % 3 else rng.getrandbits(64)
        program = compile_(
            [
                {
                    "names": ["lseek"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 99,
                    "args": [{"index": 1, "value": value, "valueTwo": value_two, "op": op}],
                }
            ]
        )
        near = [value, value + 1, value - 1, value ^ (1 << 32), value ^ 1, value ^ (1 << 63)]
        for arg in edges + near + [rng.getrandbits(64) for _ in range(8)]:
            arg &= (1 << 64) - 1
            expected = errno_ret(99) if _reference(op, arg, value, value_two) else ALLOW
            assert run_bpf(program, NR["lseek"], args=(3, arg, 0)) == expected, (op, hex(value), hex(arg))


def test_rules_or_and_conditions_and() -> None:
    program = compile_(
        [
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 11,
                "args": [
                    {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"},
                    {"index": 1, "value": 1, "op": "SCMP_CMP_EQ"},
                ],
            },
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 22,
                "args": [{"index": 0, "value": 10, "op": "SCMP_CMP_EQ"}],
            },
        ]
    )
    assert run_bpf(program, NR["socket"], args=(2, 1, 0)) == errno_ret(11)  # both conditions
    assert run_bpf(program, NR["socket"], args=(2, 2, 0)) == ALLOW  # only one
    assert run_bpf(program, NR["socket"], args=(10, 5, 0)) == errno_ret(22)  # second rule
    assert run_bpf(program, NR["socket"], args=(1, 1, 0)) == ALLOW
    # An unconditional rule for the same syscall is the fallback when no conditional rule matches.
    fallback = compile_(
        [
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}],
            },
            {"names": ["socket"], "action": "SCMP_ACT_LOG"},
        ]
    )
    assert run_bpf(fallback, NR["socket"], args=(2,)) == errno_ret(errno.EPERM)
    assert run_bpf(fallback, NR["socket"], args=(1,)) == seccomp.RET_LOG


def test_architectures_x86_i386_x32_and_bad_arch() -> None:
    config = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["socketcall", "getpid"], "action": "SCMP_ACT_ERRNO"},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 5,
                "args": [{"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_EQ"}],
            },
        ],
    }
    program = seccomp.compile_filter(config)
    i386 = syscall_table.I386
    assert run_bpf(program, i386["socketcall"], AUDIT_I386) == errno_ret(errno.EPERM)
    assert run_bpf(program, i386["getpid"], AUDIT_I386) == errno_ret(errno.EPERM)
    assert run_bpf(program, NR["getpid"], AUDIT_I386) == ALLOW  # 39 is mkdir on i386: not filtered
    assert run_bpf(program, NR["getpid"]) == errno_ret(errno.EPERM)
    assert run_bpf(program, syscall_table.X32["getpid"]) == errno_ret(errno.EPERM)
    assert run_bpf(program, syscall_table.X32["execve"]) == ALLOW
    # 32-bit ABIs compare the low half only, 64-bit ones both halves.
    assert run_bpf(program, i386["personality"], AUDIT_I386, (0xFFFFFFFF,)) == errno_ret(5)
    assert run_bpf(program, NR["personality"], args=(0xFFFFFFFF,)) == errno_ret(5)
    assert run_bpf(program, NR["personality"], args=(0x1FFFFFFFF,)) == ALLOW
    assert (
        run_bpf(program, 0, AUDIT_AARCH64) == KILL_THREAD
    )  # not in the filter: libseccomp's bad-arch action
    # Without x32 in the list the x32 half of AUDIT_ARCH_X86_64 is a bad arch as well; the native arch is
    # always included.
    native_only = seccomp.compile_filter(
        {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86"]}
    )
    assert run_bpf(native_only, syscall_table.X32["read"]) == KILL_THREAD
    assert run_bpf(native_only, NR["read"]) == ALLOW
    assert run_bpf(native_only, 3, AUDIT_I386) == ALLOW


def test_default_profile_resolution_and_size() -> None:
    program = seccomp.compile_filter(DEFAULT_PROFILE)
    assert len(program) // 8 < 4096
    allowed = DEFAULT_PROFILE["syscalls"][0]["names"]
    assert len(allowed) > 300
    for name in ("read", "openat", "execve", "arch_prctl", "futex", "rseq", "ptrace"):
        assert run_bpf(program, NR[name]) == ALLOW, name
    for name in (
        "mount",
        "umount2",
        "unshare",
        "setns",
        "reboot",
        "init_module",
        "kexec_load",
        "bpf",
        "open_by_handle_at",
        "pivot_root",
        "chroot",
        "swapon",
        "add_key",
        "acct",
        "iopl",
    ):
        assert run_bpf(program, NR[name]) == errno_ret(errno.EPERM), name
    assert run_bpf(program, NR["clone3"]) == errno_ret(errno.ENOSYS)
    clone_newns = 0x00020000
    assert run_bpf(program, NR["clone"], args=(0x01200011,)) == ALLOW  # fork-like clone flags
    assert run_bpf(program, NR["clone"], args=(clone_newns | 17,)) == errno_ret(errno.EPERM)
    assert run_bpf(program, NR["socket"], args=(socket.AF_INET,)) == ALLOW
    assert run_bpf(program, NR["socket"], args=(40,)) == errno_ret(errno.EPERM)  # AF_VSOCK
    assert run_bpf(program, NR["personality"], args=(8,)) == ALLOW
    assert run_bpf(program, NR["personality"], args=(0x0040000,)) == errno_ret(errno.EPERM)
    assert run_bpf(program, syscall_table.I386["socketcall"], AUDIT_I386) == ALLOW
    assert run_bpf(program, syscall_table.I386["mount"], AUDIT_I386) == errno_ret(errno.EPERM)
    assert run_bpf(program, syscall_table.X32["mount"]) == errno_ret(errno.EPERM)
    aarch64 = default_profile("aarch64")
    assert aarch64["architectures"] == ["SCMP_ARCH_AARCH64"]
    assert "arch_prctl" not in aarch64["syscalls"][0]["names"]


def test_a_long_profile_needs_trampolines_and_stays_correct() -> None:
    # Every syscall with its own conditional rule: thousands of instructions, jumps far beyond 255.
    names = sorted(NR)[:300]
    rules: list[dict[str, Any]] = [
        {
            "names": [name],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": NR[name] % 4096,
            "args": [{"index": 2, "value": NR[name] + 1, "op": "SCMP_CMP_EQ"}],
        }
        for name in names
    ]
    program = compile_(rules)
    assert 1000 < len(program) // 8 <= 4096
    for name in names:
        assert run_bpf(program, NR[name], args=(0, 0, NR[name] + 1)) == errno_ret(NR[name] % 4096)
        assert run_bpf(program, NR[name], args=(0, 0, NR[name])) == ALLOW
    too_many = [dict(rule, args=rule["args"] * 4) for rule in rules]
    with pytest.raises(seccomp.SeccompError, match="instructions"):
        compile_(too_many * 2)


# ---------------------------------------------------------------------------------------------------------
# Real filters in forked children


def _load(config: dict[str, Any]) -> None:
    set_no_new_privs()
    seccomp.apply(config)


def _errno_of(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_kernel_errno_with_errnoret_and_default_eperm(tmp_path: Any) -> None:
    def child() -> list[int]:
        _load(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"],
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV},
                    {"names": ["chdir"], "action": "SCMP_ACT_ERRNO"},
                ],
            }
        )
        return [_errno_of(os.mkdir, str(tmp_path / "d")), _errno_of(os.chdir, "/"), _errno_of(os.getcwd)]

    assert run_in_child(child).ok() == [errno.EXDEV, errno.EPERM, 0]
    assert not (tmp_path / "d").exists()


def test_kernel_argument_conditions() -> None:
    def child() -> list[int]:
        _load(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["socket"],
                        "action": "SCMP_ACT_ERRNO",
                        "errnoRet": errno.EAFNOSUPPORT,
                        "args": [{"index": 0, "value": socket.AF_INET, "op": "SCMP_CMP_EQ"}],
                    },
                    # type & 0xf == SOCK_DGRAM, whatever SOCK_CLOEXEC/SOCK_NONBLOCK say
                    {
                        "names": ["socket"],
                        "action": "SCMP_ACT_ERRNO",
                        "errnoRet": errno.EPROTOTYPE,
                        "args": [
                            {
                                "index": 1,
                                "value": 0xF,
                                "valueTwo": socket.SOCK_DGRAM,
                                "op": "SCMP_CMP_MASKED_EQ",
                            }
                        ],
                    },
                ],
            }
        )
        return [
            _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
            _errno_of(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
            _errno_of(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
        ]

    assert run_in_child(child).ok() == [errno.EAFNOSUPPORT, 0, errno.EPROTOTYPE]


def test_kernel_64bit_argument(tmp_path: Any) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")

    def child() -> list[int]:
        fd = os.open(path, os.O_RDONLY)
        _load(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["lseek"],
                        "action": "SCMP_ACT_ERRNO",
                        "errnoRet": errno.ERANGE,
                        "args": [{"index": 1, "value": 0x100000000, "op": "SCMP_CMP_GT"}],
                    },
                ],
            }
        )
        return [
            _errno_of(os.lseek, fd, offset, os.SEEK_SET)
            for offset in (5, 0xFFFFFFFF, 0x100000000, 0x100000001, 0x200000000)
        ]

    assert run_in_child(child).ok() == [0, 0, 0, errno.ERANGE, errno.ERANGE]


@pytest.mark.parametrize("action", ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"])
def test_kernel_kill(action: str) -> None:
    def child() -> str:
        _load({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getcwd"], "action": action}]})
        return os.getcwd()

    assert run_in_child(child).signal == signal.SIGSYS


def test_kernel_trap_delivers_sigsys_and_log_allows() -> None:
    def child() -> list[Any]:
        caught: list[int] = []
        signal.signal(signal.SIGSYS, lambda signum, frame: caught.append(signum))
        _load(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["getcwd"], "action": "SCMP_ACT_TRAP"},
                    {"names": ["uname"], "action": "SCMP_ACT_LOG"},
                ],
            }
        )
        try:
            os.getcwd()
        except OSError:
            pass
        return [caught, os.uname().sysname]

    assert run_in_child(child).ok() == [[signal.SIGSYS], "Linux"]


def test_kernel_trace_without_tracer_is_enosys_and_notify_returns_listener() -> None:
    def child() -> list[Any]:
        _load(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["chdir"], "action": "SCMP_ACT_TRACE"}],
            }
        )
        traced = _errno_of(os.chdir, "/")
        fd = seccomp.apply(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["acct"], "action": "SCMP_ACT_NOTIFY"}],
            }
        )
        assert fd is not None
        return [traced, os.readlink(f"/proc/self/fd/{fd}")]

    traced, link = run_in_child(child).ok()
    assert traced == errno.ENOSYS
    assert "seccomp notify" in link


def test_kernel_x32_bit_is_a_bad_arch_unless_listed() -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def raw_getpid_x32() -> int:
        result = libc.syscall(ctypes.c_long(syscall_table.X32["getpid"]))
        return ctypes.get_errno() if result < 0 else 0

    def without_x32() -> int:
        _load({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"]})
        return raw_getpid_x32()

    def with_x32() -> int:
        _load(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"],
                "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EL2HLT}],
            }
        )
        return raw_getpid_x32()

    assert run_in_child(without_x32).signal == signal.SIGSYS
    assert run_in_child(with_x32).ok() == errno.EL2HLT


def test_kernel_default_profile_runs_python_and_refuses_privileged_calls(tmp_path: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def raw(nr: int, *args: int) -> int:
        result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
        return ctypes.get_errno() if result < 0 else 0

    def child() -> dict[str, Any]:
        _load(DEFAULT_PROFILE)
        (tmp_path / "file").write_text("hello")
        ran = subprocess.run(["/bin/echo", "ok"], capture_output=True, text=True, check=True).stdout
        clone_newuts = 0x04000000
        clone_pid = libc.syscall(
            ctypes.c_long(NR["clone"]),
            ctypes.c_long(clone_newuts | signal.SIGCHLD),
            ctypes.c_long(0),
            ctypes.c_long(0),
            ctypes.c_long(0),
            ctypes.c_long(0),
        )
        if clone_pid == 0:
            os._exit(0)  # only if the filter failed to stop it
        return {
            "read": (tmp_path / "file").read_text(),
            "listdir": sorted(os.listdir(tmp_path)),
            "subprocess": ran,
            "unix_socket": _errno_of(lambda: socket.socketpair()[0].close()),
            "mount": raw(NR["mount"], 0, 0, 0, 0, 0),
            "unshare": raw(NR["unshare"], 0x00020000),
            "reboot": raw(NR["reboot"], 0, 0, 0, 0),  # bad magic: EINVAL if the filter let it through
            "clone_newuts": ctypes.get_errno() if clone_pid < 0 else 0,
            "clone3": raw(NR["clone3"], 0, 0),
            "personality_ok": raw(NR["personality"], 0xFFFFFFFF),
            "personality_bad": raw(NR["personality"], 0x0040000),
            # newer than every syscall the profile names (EBADF without the filter): runc's ENOSYS stub
            "newer_than_profile": raw(NR["file_getattr"], 2**32 - 1, 0, 0, 0, 0),
            "not_allowed": raw(NR["acct"], 0),
        }

    result = run_in_child(child).ok()
    assert result["read"] == "hello" and result["listdir"] == ["file"] and result["subprocess"] == "ok\n"
    assert result["unix_socket"] == 0
    for call in ("mount", "unshare", "reboot", "clone_newuts", "personality_bad", "not_allowed"):
        assert result[call] == errno.EPERM, call
    assert result["clone3"] == errno.ENOSYS
    assert result["newer_than_profile"] == errno.ENOSYS
    assert result["personality_ok"] == 0


def test_load_is_fast_and_import_is_light() -> None:
    def child() -> float:
        set_no_new_privs()
        start = time.perf_counter()
        seccomp.apply(DEFAULT_PROFILE)
        return time.perf_counter() - start

    times = sorted(run_in_child(child).ok() for _ in range(5))
    assert times[2] < 0.025, f"compile + load of the default profile took {times[2] * 1000:.1f} ms"
    modules = subprocess.run(
        [sys.executable, "-c", "import sys, clave.linux.seccomp; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for heavy in ("typing", "json", "subprocess", "seccomp"):
        assert heavy not in modules, heavy


def test_runc_rule_conventions() -> None:
    # Conditions repeating an argument index become separate rules (ORed), as runc adds them.
    either = compile_(
        [
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ERRNO",
                "args": [
                    {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"},
                    {"index": 1, "value": 15, "op": "SCMP_CMP_EQ"},
                ],
            }
        ]
    )
    assert [run_bpf(either, NR["kill"], args=(1, sig)) for sig in (9, 15, 2)] == [
        errno_ret(errno.EPERM),
        errno_ret(errno.EPERM),
        ALLOW,
    ]
    # A rule with the default action is left out, so it cannot shadow a later rule.
    shadow = compile_(
        [
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}],
            },
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}],
            },
        ],
        default="SCMP_ACT_ERRNO",
    )
    assert run_bpf(shadow, NR["kill"], args=(1, 0)) == ALLOW
    with pytest.raises(seccomp.SeccompError, match="write"):
        compile_([{"names": ["write"], "action": "SCMP_ACT_NOTIFY"}])
    with pytest.raises(seccomp.SeccompError, match="default action"):
        seccomp.compile_filter({"defaultAction": "SCMP_ACT_NOTIFY"})


def test_kernel_notify_round_trip_through_the_listener() -> None:
    import fcntl
    import threading

    notif_recv, notif_send = 0xC0502100, 0xC0182101  # SECCOMP_IOCTL_NOTIF_RECV / _SEND on x86_64

    def child() -> list[Any]:
        signal.alarm(10)  # a lost notification would block uname forever
        rules = [{"names": ["uname"], "action": "SCMP_ACT_NOTIFY"}]
        listener = seccomp.apply({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules})
        assert listener is not None
        seen: list[int] = []

        def supervise() -> None:
            notification = bytearray(80)  # struct seccomp_notif: id, pid, flags, seccomp_data
            fcntl.ioctl(listener, notif_recv, notification)
            notif_id, pid, _flags, nr = struct.unpack_from("<QIIi", notification)
            seen.extend([pid, nr])
            response = bytearray(struct.pack("<QqiI", notif_id, 0, -errno.EOWNERDEAD, 0))
            fcntl.ioctl(listener, notif_send, response)

        supervisor = threading.Thread(target=supervise)
        supervisor.start()
        result = _errno_of(os.uname)
        supervisor.join()
        return [result, seen]

    result, (pid, nr) = run_in_child(child).ok()
    assert result == errno.EOWNERDEAD
    assert nr == NR["uname"] and pid > 0
