"""Behaviour of the well-known types, mixed into the generated Any, Timestamp and google.rpc.Status."""

from __future__ import annotations

from clave.proto._wire import DecodeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self

    from clave.proto._message import Message

_NS = 1_000_000_000


def message_class(full_name: str) -> type[Message]:
    """The generated class of a message, by its full protobuf name (imports its module on first use)."""
    from clave.proto.generated._registry import MESSAGES

    try:
        module_name, class_name = MESSAGES[full_name]
    except KeyError:
        raise DecodeError(f"unknown message type {full_name!r}") from None
    module = __import__(module_name, fromlist=[class_name])
    cls: type[Message] = getattr(module, class_name)
    return cls


class AnyMixin:
    """google.protobuf.Any: a message together with the name of its type."""

    __slots__ = ()
    type_url: str
    value: bytes

    @classmethod
    def pack(cls, message: Message, prefix: str = "") -> Self:
        """Wrap ``message``. containerd's typeurl names protobuf types by their bare full name (no prefix);
        Google's convention is ``prefix="type.googleapis.com/"``."""
        return cls(type_url=prefix + message.FULL_NAME, value=message.encode())  # type: ignore[call-arg]

    @property
    def type_name(self) -> str:
        """The full message name: the type URL after its last '/'."""
        return self.type_url.rpartition("/")[2]

    def is_type(self, cls: type[Message]) -> bool:
        return self.type_name == cls.FULL_NAME

    def unpack(self) -> Message:
        """Decode the wrapped message; DecodeError if its type is not one Clave knows."""
        return message_class(self.type_name).decode(self.value)


class TimestampMixin:
    """google.protobuf.Timestamp, convertible to and from nanoseconds since the epoch."""

    __slots__ = ()
    seconds: int
    nanos: int

    @classmethod
    def from_ns(cls, ns: int) -> Self:
        seconds, nanos = divmod(ns, _NS)
        return cls(seconds=seconds, nanos=nanos)  # type: ignore[call-arg]

    def to_ns(self) -> int:
        return self.seconds * _NS + self.nanos

    @classmethod
    def now(cls) -> Self:
        import time

        return cls.from_ns(time.time_ns())


class StatusMixin:
    """google.rpc.Status: a gRPC status code and message."""

    __slots__ = ()
    code: int
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
