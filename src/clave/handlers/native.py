"""The native handler: a Linux container whose init execs the entrypoint (what runc does)."""

from __future__ import annotations

from clave.handlers.linux import LinuxHandler


class NativeHandler(LinuxHandler):
    name = "native"
