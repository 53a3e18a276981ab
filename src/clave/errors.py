"""The runtime's user-facing error: one line, printed by the CLI and logged as a runc-style JSON line.

The subclasses say what kind of failure it was, so callers (the CLI's exit codes, the shim's status codes, a
``delete --force`` that tolerates a missing container) decide by class, never by the message's text.
"""


class ClaveError(Exception):
    """A failure to report to the caller as one line; ``exit_code`` is the process exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotFound(ClaveError):
    """The named container (or another object a request names) does not exist."""


class AlreadyExists(ClaveError):
    """A container with that id exists already."""


class WrongState(ClaveError):
    """The container's status does not allow the operation (start a running one, pause a stopped one...)."""


class InvalidArgument(ClaveError):
    """The request itself is malformed: a bad container id, flag value or config."""


class Unsupported(ClaveError):
    """A valid request that this runtime, handler or host cannot carry out."""


def os_error_message(exc: OSError) -> str:
    """An OS error as one line in plain words ("PATH: No such file or directory"), without Python's
    "[Errno N]" prefix."""
    text = exc.strerror or type(exc).__name__
    return f"{exc.filename}: {text}" if exc.filename else text
