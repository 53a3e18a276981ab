# The exec trampoline of src/clave/linux/trampoline.py (GNU as, x86_64); a test checks the bytes match.
    .intel_syntax noprefix
    .globl _start
_start:
    mov    rbx, rsp
    mov    rcx, [rbx]
    cmp    rcx, 2
    jl     quit
    mov    rsi, [rbx+8]
    xor    r12d, r12d
    movzx  eax, byte ptr [rsi]
    test   al, al
    jz     quit
digit:
    movzx  eax, byte ptr [rsi]
    test   al, al
    jz     parsed
    sub    eax, 48
    cmp    eax, 9
    ja     quit
    imul   r12, r12, 10
    add    r12, rax
    inc    rsi
    jmp    digit
parsed:
    mov    eax, 72
    mov    rdi, r12
    mov    esi, 2
    mov    edx, 1
    syscall
    test   rax, rax
    js     failed
    mov    rdi, [rbx+16]
    lea    rsi, [rbx+24]
    mov    rcx, [rbx]
    lea    rdx, [rbx+rcx*8+16]
    mov    eax, 59
    syscall
failed:
    neg    eax
    mov    byte ptr [rsp-16], 88
    mov    byte ptr [rsp-15], al
    mov    eax, 1
    mov    rdi, r12
    lea    rsi, [rsp-16]
    mov    edx, 2
    syscall
quit:
    mov    edi, 127
    mov    eax, 231
    syscall
