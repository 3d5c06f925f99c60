"""Just enough of Go's encoding/gob for the Djinn server's build payload.

The server queues a build as the gob encoding of `Payload{Host string; BuildID
int64}`, each with a fresh encoder, so every payload carries its own type
definition (type id 65) followed by one value. `encode_payload` writes exactly
the bytes Go writes; `decode_payload` reads what any gob encoder may send for a
struct with those fields (fields in any order, other fields of basic types
skipped, zero values left out), and raises GobError for anything else.

The wire format is the one documented by the Go standard library's
encoding/gob package; tests/fixtures/curlyq holds bytes printed by Go itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# Type ids gob predefines for basic types, and the first one an encoder assigns.
BOOL, INT, UINT, FLOAT, BYTES, STRING, COMPLEX = 1, 2, 3, 4, 5, 6, 7
FIRST_USER_TYPE = 65
PAYLOAD_TYPE = "Payload"
MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)


class GobError(ValueError):
    """The bytes are not a gob-encoded build payload."""


@dataclass(frozen=True)
class Payload:
    """What the Djinn server puts on the queue for a build (upstream's build.Payload)."""

    host: str
    build_id: int


# -- encoding -------------------------------------------------------------------


def _uint(n: int) -> bytes:
    """An unsigned gob integer: one byte below 128, else minus the byte count, then big-endian bytes."""
    if n < 0 or n >= 2**64:
        raise GobError(f"{n} does not fit an unsigned 64-bit gob integer")
    if n < 128:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([256 - len(body)]) + body


def _int(n: int) -> bytes:
    """A signed gob integer: the sign moved to the lowest bit (complemented when negative)."""
    if not MIN_INT64 <= n <= MAX_INT64:
        raise GobError(f"{n} does not fit a signed 64-bit gob integer")
    return _uint(n << 1 if n >= 0 else ((~n) << 1) | 1)


def _string(s: bytes) -> bytes:
    return _uint(len(s)) + s


def _message(body: bytes) -> bytes:
    return _uint(len(body)) + body


def _payload_type_definition(type_id: int) -> bytes:
    """wireType{StructT: structType{CommonType{Name, Id}, Field: [Host string, BuildID int]}}."""
    fields = [("Host", STRING), ("BuildID", INT)]
    field_list = _uint(len(fields)) + b"".join(
        b"\x01" + _string(name.encode()) + b"\x01" + _int(type_) + b"\x00" for name, type_ in fields
    )
    common = b"\x01" + _string(PAYLOAD_TYPE.encode()) + b"\x01" + _int(type_id) + b"\x00"
    struct_type = b"\x01" + common + b"\x01" + field_list + b"\x00"
    # StructT is the third field of wireType: delta 3 from the start.
    return _int(-type_id) + b"\x03" + struct_type + b"\x00"


def encode_payload(host: str, build_id: int) -> bytes:
    """The gob bytes Go's `gob.NewEncoder(w).Encode(Payload{host, build_id})` writes."""
    value = b""
    field, last = 0, -1
    if host:
        value += _uint(field - last) + _string(host.encode())
        last = field
    field = 1
    if build_id:
        value += _uint(field - last) + _int(build_id)
    value = _int(FIRST_USER_TYPE) + value + b"\x00"
    return _message(_payload_type_definition(FIRST_USER_TYPE)) + _message(value)


# -- decoding -------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise GobError("the gob data ends in the middle of a value")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise GobError("the gob data ends in the middle of a value")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self) -> int:
        first = self.byte()
        if first < 128:
            return first
        count = 256 - first
        if count > 8:
            raise GobError(f"a gob integer of {count} bytes (at most 8 allowed)")
        return int.from_bytes(self.take(count), "big")

    def int(self) -> int:
        u = self.uint()
        return ~(u >> 1) if u & 1 else u >> 1

    def bytes(self) -> bytes:
        return self.take(self.uint())

    def at_end(self) -> bool:
        return self.pos >= len(self.data)


@dataclass
class _StructType:
    name: str
    fields: list[tuple[str, int]]


def _read_struct(r: _Reader, read_field: Callable[[int], None]) -> None:
    """Walk one struct value: `read_field(index)` reads the value of each field present."""
    index = -1
    while True:
        delta = r.uint()
        if delta == 0:
            return
        index += delta
        read_field(index)


def _read_type_definition(r: _Reader) -> _StructType:
    """A wireType; only struct types are supported (the payload is one)."""
    found: list[_StructType] = []

    def wire_field(index: int) -> None:
        if index != 2:
            raise GobError("the gob payload defines a type that is not a struct")
        name, fields = "", []

        def struct_field(i: int) -> None:
            nonlocal name
            if i == 0:

                def common_field(j: int) -> None:
                    nonlocal name
                    if j == 0:
                        name = r.bytes().decode("utf-8", "replace")
                    elif j == 1:
                        r.int()
                    else:
                        raise GobError("unexpected field in a gob type definition")

                _read_struct(r, common_field)
            elif i == 1:
                for _ in range(r.uint()):
                    entry: dict[str, Any] = {"name": "", "id": 0}

                    def field_type(j: int, entry: dict[str, Any] = entry) -> None:
                        if j == 0:
                            entry["name"] = r.bytes().decode("utf-8", "replace")
                        elif j == 1:
                            entry["id"] = r.int()
                        else:
                            raise GobError("unexpected field in a gob field type")

                    _read_struct(r, field_type)
                    fields.append((entry["name"], entry["id"]))
            else:
                raise GobError("unexpected field in a gob struct type")

        _read_struct(r, struct_field)
        found.append(_StructType(name, fields))

    _read_struct(r, wire_field)
    if not found:
        raise GobError("an empty gob type definition")
    return found[0]


def _read_basic(r: _Reader, type_id: int) -> object:
    if type_id == BOOL:
        return r.uint() != 0
    if type_id == INT:
        return r.int()
    if type_id in (UINT, FLOAT):
        return r.uint()
    if type_id in (BYTES, STRING):
        return r.bytes()
    if type_id == COMPLEX:
        return (r.uint(), r.uint())
    raise GobError(f"the gob payload has a field of type id {type_id}, which this worker cannot read")


def decode_payload(data: bytes) -> Payload:
    """The Payload in `data`, as Go's decoder would fill a build.Payload from it."""
    r = _Reader(bytes(data))
    types: dict[int, _StructType] = {}
    while True:
        if r.at_end():
            raise GobError("no payload value in the gob data" if types else "the gob data is empty")
        length = r.uint()
        end = r.pos + length
        if end > len(r.data):
            raise GobError("a gob message is longer than the data")
        type_id = r.int()
        if type_id < 0:
            types[-type_id] = _read_type_definition(r)
        else:
            if type_id not in types:
                raise GobError(f"the gob value has type id {type_id}, which is not a struct defined before it")
            values = _read_struct_value(r, types[type_id])
            break
        if r.pos != end:
            raise GobError("a gob message's length does not match its content")
    host = values.get("Host", b"")
    build_id = values.get("BuildID", 0)
    if not isinstance(host, bytes) or not isinstance(build_id, int) or isinstance(build_id, bool):
        raise GobError("the gob payload's Host is not a string or its BuildID not an integer")
    try:
        return Payload(host.decode("utf-8"), build_id)
    except UnicodeDecodeError:
        raise GobError("the gob payload's Host is not UTF-8") from None


def _read_struct_value(r: _Reader, struct: _StructType) -> dict[str, object]:
    types = {"Host": STRING, "BuildID": INT}
    values: dict[str, object] = {}

    def read_field(index: int) -> None:
        if index >= len(struct.fields):
            raise GobError("a gob value has more fields than its type")
        name, type_id = struct.fields[index]
        if name in types and type_id != types[name]:
            raise GobError(f"the gob payload's {name} has type id {type_id}, not the one build.Payload has")
        values[name] = _read_basic(r, type_id)

    _read_struct(r, read_field)
    return values
