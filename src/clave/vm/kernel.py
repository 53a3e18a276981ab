"""Debian's cloud kernel made bootable by QEMU's PVH entry, and the modules the guest loads.

The bzImage carries the kernel as an LZ4 payload (``CONFIG_KERNEL_LZ4``); decompressed it is an ELF
``vmlinux`` with the Xen/PVH entry note, which ``-kernel`` boots directly (no firmware, no real-mode setup).
The .deb ships no modules.dep (depmod makes it at install time), so dependencies come from each module's
``.modinfo`` section.
"""

from __future__ import annotations

import os
import struct
import subprocess

from clave.vm.errors import BuildError

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ELF_MAGIC = b"\x7fELF"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is LZ4 (decompressed with Debian's ``lz4``)."""
    if len(bzimage) < 0x260 or bzimage[0x202:0x206] != b"HdrS":
        raise BuildError("kernel: not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload[:4] != LZ4_LEGACY_MAGIC:
        raise BuildError(f"kernel: payload is not LZ4 (magic {payload[:4].hex()}); Debian's cloud kernel is")
    try:
        done = subprocess.run(["lz4", "-dc"], input=payload, capture_output=True, check=False)
    except FileNotFoundError:
        raise BuildError("kernel: lz4 not found: install Debian's lz4") from None
    # The payload ends with the decompressed size (4 bytes), which lz4 may report as trailing garbage.
    if not done.stdout.startswith(ELF_MAGIC):
        raise BuildError(f"kernel: lz4 failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _modinfo(path: str) -> dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != ELF_MAGIC or data[4] != 2:
        raise BuildError(f"kernel module {path}: not an ELF64 object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, str] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name : end] == b".modinfo":
            for item in data[offset : offset + size].split(b"\0"):
                key, eq, value = item.decode(errors="replace").partition("=")
                if eq:
                    info.setdefault(key, value)
    return info


def module_load_order(modules_dir: str, wanted: list[str]) -> list[tuple[str, str]]:
    """``(name, path relative to modules_dir)`` of ``wanted`` and their dependencies, dependencies first.
    Built-in modules (modules.builtin) need no loading and are left out."""
    builtin: set[str] = set()
    builtin_file = os.path.join(modules_dir, "modules.builtin")
    if os.path.exists(builtin_file):
        with open(builtin_file) as f:
            builtin = {_name_of(line.strip()) for line in f if line.strip()}
    paths: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(modules_dir):
        for fname in files:
            if fname.endswith(".ko"):
                paths[_name_of(fname)] = os.path.relpath(os.path.join(dirpath, fname), modules_dir)
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _name_of(name)
        if name in seen or name in builtin:
            return
        if name not in paths:
            needed_by = " <- ".join(chain) or "the guest"
            raise BuildError(f"kernel module {name} (needed by {needed_by}) is not in the kernel package")
        seen.add(name)
        depends = _modinfo(os.path.join(modules_dir, paths[name])).get("depends", "")
        for dep in sorted(d for d in depends.split(",") if d):
            visit(dep, (name, *chain))
        order.append((name, paths[name]))

    for name in wanted:
        visit(name, ())
    return order


def _name_of(path: str) -> str:
    """Module name as the kernel spells it: file name without .ko, dashes as underscores."""
    base = os.path.basename(path)
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")
