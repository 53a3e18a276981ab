"""ttrpc errors: gRPC status codes carried as google.rpc.Status in every Response."""

from __future__ import annotations

from clave.proto.generated.google_rpc import Status


class Code:
    """gRPC status codes (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    NAMES = {
        0: "OK",
        1: "Canceled",
        2: "Unknown",
        3: "InvalidArgument",
        4: "DeadlineExceeded",
        5: "NotFound",
        6: "AlreadyExists",
        7: "PermissionDenied",
        8: "ResourceExhausted",
        9: "FailedPrecondition",
        10: "Aborted",
        11: "OutOfRange",
        12: "Unimplemented",
        13: "Internal",
        14: "Unavailable",
        15: "DataLoss",
        16: "Unauthenticated",
    }


class TtrpcError(Exception):
    """A call failed with a non-OK status. Handlers raise it to return that status to the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{Code.NAMES.get(self.code, f'code {self.code}')}: {self.message}"

    def to_status(self) -> Status:
        return Status(code=self.code, message=self.message)

    @classmethod
    def from_status(cls, status: Status) -> TtrpcError:
        return cls(status.code, status.message)


def _error_codes() -> tuple[tuple[type[Exception], int], ...]:
    from clave.errors import AlreadyExists, InvalidArgument, NotFound, Unsupported, WrongState

    return ((NotFound, Code.NOT_FOUND), (AlreadyExists, Code.ALREADY_EXISTS), (WrongState, Code.FAILED_PRECONDITION),
            (InvalidArgument, Code.INVALID_ARGUMENT), (Unsupported, Code.UNIMPLEMENTED))


def from_clave_error(exc: Exception) -> TtrpcError:
    """Clave's error classes as gRPC status codes, as containerd's errdefs expect them (the shim and the guest
    agent answer the same way)."""
    code: int = next((code for cls, code in _error_codes() if isinstance(exc, cls)), Code.UNKNOWN)
    return TtrpcError(code, str(exc))


def to_clave_error(code: int | None, message: str) -> Exception:
    """The other way: a status code from the guest agent (or a shim) as Clave's error class, ClaveError when no
    class has the code."""
    from clave.errors import ClaveError

    cls = next((cls for cls, known in _error_codes() if known == code), ClaveError)
    return cls(message)
