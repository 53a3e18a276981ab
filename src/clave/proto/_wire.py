"""Protocol buffers wire format: the primitives the generated message classes call.

Kept to plain functions over ``bytes`` so that encoding and decoding a shim request costs microseconds and
importing this module costs nothing beyond ``struct``.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
MASK64 = (1 << 64) - 1

_ONE_BYTE = [bytes((i,)) for i in range(128)]
_F32 = struct.Struct("<I")
_F64 = struct.Struct("<Q")
_SF32 = struct.Struct("<i")
_SF64 = struct.Struct("<q")
_FLOAT = struct.Struct("<f")
_DOUBLE = struct.Struct("<d")


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the message."""


def varint(value: int) -> bytes:
    """Encode an unsigned varint; negative numbers are sign-extended to 64 bits as protobuf does."""
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if value < 0:
        value &= MASK64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``: (value, position after it)."""
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def read_length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a length prefix: (start, stop) of the delimited bytes, checked against ``end``."""
    n = buf[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = read_varint(buf, pos)
    stop = pos + n
    if stop > end:
        raise DecodeError("length-delimited field runs past the end of the message")
    return pos, stop


def length_prefixed(tag: bytes, data: bytes) -> bytes:
    n = len(data)
    return tag + (_ONE_BYTE[n] if n < 128 else varint(n)) + data


def zigzag(value: int) -> int:
    return ((value << 1) ^ (value >> 63)) & MASK64


def unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def to_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - 0x100000000 if value & 0x80000000 else value


def to_int64(value: int) -> int:
    return value - 0x10000000000000000 if value & 0x8000000000000000 else value


def skip_field(buf: bytes, pos: int, end: int, tag: int) -> int:
    """Skip the value of an unknown field (proto3 drops unknown fields on decode)."""
    wire_type = tag & 7
    if tag >> 3 == 0:
        raise DecodeError("field number 0 is invalid")
    if wire_type == VARINT:
        return read_varint(buf, pos)[1]
    if wire_type == LENGTH:
        return read_length(buf, pos, end)[1]
    if wire_type == FIXED64:
        pos += 8
    elif wire_type == FIXED32:
        pos += 4
    elif wire_type == START_GROUP:
        field = tag >> 3
        while True:
            if pos >= end:
                raise DecodeError("unterminated group")
            inner, pos = read_varint(buf, pos)
            if inner & 7 == END_GROUP:
                if inner >> 3 != field:
                    raise DecodeError("mismatched end of group")
                return pos
            pos = skip_field(buf, pos, end, inner)
    else:
        raise DecodeError(f"invalid wire type {wire_type}")
    if pos > end:
        raise DecodeError("fixed-width field runs past the end of the message")
    return pos


def read_packed(buf: bytes, pos: int, end: int, reader: Callable[[bytes, int], tuple[int, int]]) -> tuple[list, int]:
    """Decode a packed repeated varint field: (values, position after it)."""
    start, stop = read_length(buf, pos, end)
    values = []
    while start < stop:
        value, start = reader(buf, start)
        values.append(value)
    if start != stop:
        raise DecodeError("packed field overruns its length")
    return values, stop


def read_fixed32(buf: bytes, pos: int) -> tuple[int, int]:
    return _F32.unpack_from(buf, pos)[0], pos + 4


def read_fixed64(buf: bytes, pos: int) -> tuple[int, int]:
    return _F64.unpack_from(buf, pos)[0], pos + 8


def read_sfixed32(buf: bytes, pos: int) -> tuple[int, int]:
    return _SF32.unpack_from(buf, pos)[0], pos + 4


def read_sfixed64(buf: bytes, pos: int) -> tuple[int, int]:
    return _SF64.unpack_from(buf, pos)[0], pos + 8


def read_float(buf: bytes, pos: int) -> tuple[float, int]:
    return _FLOAT.unpack_from(buf, pos)[0], pos + 4


def read_double(buf: bytes, pos: int) -> tuple[float, int]:
    return _DOUBLE.unpack_from(buf, pos)[0], pos + 8


pack_fixed32 = _F32.pack
pack_fixed64 = _F64.pack
pack_sfixed32 = _SF32.pack
pack_sfixed64 = _SF64.pack
pack_float = _FLOAT.pack
pack_double = _DOUBLE.pack
