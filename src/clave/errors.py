"""The runtime's user-facing error: one line, printed by the CLI and logged as a runc-style JSON line."""


class ClaveError(Exception):
    """A failure to report to the caller as one line; ``exit_code`` is the process exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
