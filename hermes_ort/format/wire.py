"""The protocol-buffer wire format, as far as ONNX files use it: a message is a tuple of fields, each kept as
read, so a message re-encodes to the bytes it came from.

A run reads stage graphs and writes templates (format/onnx_proto.py) through this instead of the `onnx`
package, whose protobuf runtime and ml_dtypes cost a process 16 MiB of RSS and 0.6 s to import (`python -c
"import onnxruntime, onnx"` against `import onnxruntime` alone, ru_maxrss and `-X importtime`). Groups
(wire types 3 and 4) are not part of ONNX and are refused.
"""
from __future__ import annotations

from typing import Iterable, Union

VARINT, I64, LEN, I32 = 0, 1, 2, 5
Field = tuple[int, int, Union[int, bytes]]  # (number, wire type, value): an int for VARINT, else the bytes
_MASK = (1 << 64) - 1


class WireError(ValueError):
    """Bytes that are not a well-formed protocol-buffer message."""


def varint(data: bytes, at: int) -> tuple[int, int]:
    """The unsigned varint at `at`, and the offset after it."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise WireError(f"truncated or overlong varint at byte {at}")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def parse(data: bytes) -> tuple[Field, ...]:
    """Every field of one message, in the order the bytes hold them."""
    fields, at, end = [], 0, len(data)
    while at < end:
        key, at = (data[at], at + 1) if data[at] < 0x80 else varint(data, at)  # one byte: field numbers < 16
        number, kind = key >> 3, key & 7
        if kind == VARINT:
            value, at = (data[at], at + 1) if at < end and data[at] < 0x80 else varint(data, at)
        elif kind == LEN or kind == I64 or kind == I32:
            if kind == LEN:
                size, at = (data[at], at + 1) if at < end and data[at] < 0x80 else varint(data, at)
            else:
                size = 8 if kind == I64 else 4
            if at + size > end:
                raise WireError(f"field {number} needs {size} bytes at byte {at}, the message ends at {end}")
            value, at = data[at:at + size], at + size
        else:
            raise WireError(f"field {number} has wire type {kind}, which ONNX does not use")
        if number == 0:
            raise WireError(f"field number 0 at byte {at}")
        fields.append((number, kind, value))
    return tuple(fields)


def put_varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL[value]
    value &= _MASK  # int64's negative values are ten-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes([v]) for v in range(0x80)]


def encode(fields: Iterable[Field]) -> bytes:
    out = []
    for number, kind, value in fields:
        out.append(put_varint(number << 3 | kind))
        if kind == VARINT:
            out.append(put_varint(value))
        else:
            if kind == LEN:
                out.append(put_varint(len(value)))
            out.append(value)
    return b"".join(out)


def signed(value: int) -> int:
    """An int64 read as a varint."""
    return value - (1 << 64) if value >> 63 else value


def ints(fields: tuple[Field, ...], number: int) -> tuple[int, ...]:
    """A repeated int64 field, packed or not."""
    found = []
    for n, wire, value in fields:
        if n == number and wire == VARINT:
            found.append(signed(value))
        elif n == number and wire == LEN:
            at = 0
            while at < len(value):
                item, at = varint(value, at)
                found.append(signed(item))
    return tuple(found)


def with_fields(fields: tuple[Field, ...], number: int, new: Iterable[Field]) -> tuple[Field, ...]:
    """The message with every field `number` replaced by `new`, placed in field-number order (as protobuf
    writes a message) and the other fields left as they are."""
    kept = [f for f in fields if f[0] != number]
    at = next((k for k, f in enumerate(kept) if f[0] > number), len(kept))
    return (*kept[:at], *new, *kept[at:])
