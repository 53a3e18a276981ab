"""The exec trampoline: the container's program is never exec'd by a process whose executable is the host's
Python (CVE-2019-5736).

Clave's init and `exec` processes are forked Python, so until they exec, /proc/self/exe is the host's
interpreter. A container that names /proc/self/exe as its entrypoint, as an exec'd program, as a
``#!/proc/self/exe`` interpreter or as an ELF interpreter would make the kernel run that host binary inside
the container, where it could be reopened for writing (Linux 6.11+ no longer refuses writes to a running
executable). So the last step goes through a 264-byte static program held in a sealed memfd: the process
execs it first (execveat on the memfd: no path, no host file), and it execs the container's program. From
then on /proc/self/exe is that sealed, unwritable memfd; exec'ing it again only runs the trampoline.

The trampoline is started as ``[STATUS_FD, PATH, ARGV0, ARGV1, ...]``: it marks STATUS_FD close-on-exec,
then ``execve(PATH, &argv[2], envp)``; if that fails it writes b"X" and the errno as one byte to STATUS_FD
and exits 127. Started any other way (argv[0] not a number) it exits 127 at once. Its source, assembled
with GNU as (``as --64``) for the bytes below:

    _start: mov rbx, rsp;  mov rcx, [rbx];  cmp rcx, 2;  jl quit         ; argc >= 2
            mov rsi, [rbx+8];  xor r12d, r12d                            ; r12 = status fd from argv[0]
            movzx eax, byte [rsi];  test al, al;  jz quit
    digit:  movzx eax, byte [rsi];  test al, al;  jz parsed
            sub eax, '0';  cmp eax, 9;  ja quit
            imul r12, r12, 10;  add r12, rax;  inc rsi;  jmp digit
    parsed: mov eax, 72;  mov rdi, r12;  mov esi, 2;  mov edx, 1;  syscall          ; fcntl F_SETFD FD_CLOEXEC
            test rax, rax;  js failed
            mov rdi, [rbx+16];  lea rsi, [rbx+24]                                   ; execve(argv[1], argv+2,
            mov rcx, [rbx];  lea rdx, [rbx+rcx*8+16];  mov eax, 59;  syscall        ;        envp)
    failed: neg eax;  mov byte [rsp-16], 'X';  mov [rsp-15], al
            mov eax, 1;  mov rdi, r12;  lea rsi, [rsp-16];  mov edx, 2;  syscall    ; write(fd, "X" errno, 2)
    quit:   mov edi, 127;  mov eax, 231;  syscall                                   ; exit_group(127)
"""

from __future__ import annotations

import fcntl
import os
import struct

# x86_64 machine code of the program above (tests/security/trampoline.s is the source; a test reassembles it).
X86_64_CODE = bytes.fromhex(
    "4889e3488b0b4883f9027c78488b73084531e40fb60684c0746a0fb60684c0741483e83083f809775b4d6be40a4901c4"
    "48ffc6ebe5b8480000004c89e7be02000000ba010000000f054885c07817488b7b10488d7318488b0b488d54cb10b83b"
    "0000000f05f7d8c64424f058884424f1b8010000004c89e7488d7424f0ba020000000f05bf7f000000b8e70000000f05"
)
_BASE = 0x400000
_HEADERS = 64 + 56  # one ELF64 header and one program header before the code

# The system calls the trampoline makes, with the arguments that matter to a seccomp filter.
AT_EMPTY_PATH = 0x1000
SYSCALLS = (("execveat", (-1, 0, 0, 0, AT_EMPTY_PATH)), ("fcntl", (0, 2, 1)), ("execve", ()), ("write", ()),
            ("exit_group", ()))

F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8


def elf(code: bytes = X86_64_CODE) -> bytes:
    """A minimal static ELF64 executable for x86_64 whose one loadable segment (read + execute) is ``code``."""
    size = _HEADERS + len(code)
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,  # 64-bit, little-endian, version 1, System V ABI
        2, 62, 1, _BASE + _HEADERS, 64, 0,     # ET_EXEC, EM_X86_64, version, entry, phoff, no sections
        0, 64, 56, 1, 0, 0, 0,
    )
    program_header = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + program_header + code


def available() -> bool:
    return os.uname().machine == "x86_64"


def sealed_fd() -> int:
    """A close-on-exec memfd holding the trampoline, sealed against any change, ready for execveat."""
    fd = os.memfd_create("clave-exec", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, elf())
        os.fchmod(fd, 0o555)
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def failure(data: bytes) -> int | None:
    """The errno the trampoline reported in ``data`` (what its status fd received), or None."""
    return data[1] if len(data) >= 2 and data[:1] == b"X" else None
