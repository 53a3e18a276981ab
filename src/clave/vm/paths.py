"""Where the VM layer keeps its host state. ``CLAVE_VM_ROOT`` moves all of it (tests use the default)."""

from __future__ import annotations

import os

VM_ROOT = os.environ.get("CLAVE_VM_ROOT", "/var/lib/clave/vm")
GUEST_CACHE = os.path.join(VM_ROOT, "guest")  # one directory per build key, plus the "current" symlink
DEB_CACHE = os.path.join(VM_ROOT, "debs")  # the .deb files, by their Debian file names
ACCEL_CACHE = os.path.join(VM_ROOT, "accel.json")  # the KVM probe's verdict per host/kernel/qemu
QEMU_VERSION_CACHE = os.path.join(VM_ROOT, "qemu-version")  # the binary's identity and its version line
