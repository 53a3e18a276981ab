"""Errors of the VM layer: each is one line for the caller (a ClaveError), with a class per failure kind."""

from __future__ import annotations

from clave.errors import ClaveError


class VmError(ClaveError):
    """Any failure of the VM layer."""


class BuildError(VmError):
    """The guest could not be built (a package missing, a tool failing, an unexpected kernel image)."""


class ResourceError(VmError):
    """vCPUs or memory out of bounds, or more than this host has."""


class BootError(VmError):
    """The guest did not come up; the message ends with the tail of its console."""


class VmGone(VmError):
    """QEMU exited (killed, crashed or the guest powered off) while the caller still needed it."""


class AgentError(VmError):
    """The guest agent refused a request or did not answer in time; carries the ttrpc status code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
