"""The ONNX messages a run reads and writes (stage graphs, templates, merged and transposed graphs), over
the wire format (wire.py), without the `onnx` package.

Each view holds its message's fields as read and names the ONNX fields the engine uses (onnx.proto's
field numbers); builders write fields in field-number order, as protobuf does, and keep every field they
do not name as it was: templates, merged and transposed graphs come out as the bytes onnx's helpers write
for them (tests/test_onnx_proto.py).
"""
from __future__ import annotations

import struct
from functools import cached_property
from pathlib import Path
from typing import Iterable

from . import wire
from .wire import LEN, VARINT, Field

INT, TENSOR, GRAPH, INTS, GRAPHS = 2, 4, 5, 7, 10  # AttributeProto.AttributeType
INT64 = 7  # TensorProto.DataType
NUMPY_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128"}


def string(number: int, text: str) -> Field:
    return number, LEN, text.encode()


def integer(number: int, value: int) -> Field:
    return number, VARINT, value & ((1 << 64) - 1)


def submessage(number: int, message: "Message") -> Field:
    return number, LEN, message.to_bytes()


class _Parsed:
    """The submessages of one field number (`many`), or its last one, parsed on first use and kept on the
    instance (a non-data descriptor: the instance's value hides it from then on)."""

    def __init__(self, number: int, kind: type, many: bool = True):
        self.number, self.kind, self.many = number, kind, many

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        found = tuple(self.kind.parse(v) for v in obj.every(self.number))
        obj.__dict__[self.name] = found if self.many else (found[-1] if found else self.kind(()))
        return obj.__dict__[self.name]


def _text(number: int) -> cached_property:
    return cached_property(lambda self: self.last(number, b"").decode())


def _number(number: int) -> cached_property:
    return cached_property(lambda self: wire.signed(self.last(number, 0, VARINT)))


class Message:
    """One message's fields as read (wire.parse)."""

    def __init__(self, fields: Iterable[Field], raw: bytes | None = None):
        self.fields, self.raw = tuple(fields), raw  # raw: the bytes it was read from

    @classmethod
    def parse(cls, data: bytes):
        return cls(wire.parse(data), data)

    def to_bytes(self) -> bytes:
        return self.raw if self.raw is not None else wire.encode(self.fields)

    def last(self, number: int, default=None, kind: int = LEN):
        """A singular field's value (an int for VARINT, else bytes): the last one read wins, as in protobuf."""
        found = self.every(number, kind)
        return found[-1] if found else default

    def every(self, number: int, kind: int = LEN) -> tuple:
        """Every value of field `number`, which must have wire type `kind`."""
        values, kinds = self._index
        if kinds.get(number, kind) != kind:
            raise wire.WireError(f"{type(self).__name__} field {number} does not have wire type {kind}")
        return values.get(number, ())

    @cached_property
    def _index(self) -> tuple[dict[int, tuple], dict[int, int]]:
        """By field number: its values, and its wire type (-1 where fields of that number disagree)."""
        values: dict[int, list] = {}
        kinds: dict[int, int] = {}
        for n, w, v in self.fields:
            values.setdefault(n, []).append(v)
            kinds[n] = w if kinds.get(n, w) == w else -1
        return {n: tuple(v) for n, v in values.items()}, kinds

    def replaced(self, number: int, new: Iterable[Field]):
        return type(self)(wire.with_fields(self.fields, number, new))


class Entry(Message):  # StringStringEntryProto
    key, value = _text(1), _text(2)


class OpsetId(Message):  # OperatorSetIdProto
    domain, version = _text(1), _number(2)

    @classmethod
    def make(cls, domain: str, version: int) -> "OpsetId":
        return cls([string(1, domain), integer(2, version)])


class Tensor(Message):  # TensorProto
    name, data_type = _text(8), _number(2)
    entries = _Parsed(13, Entry)

    @cached_property
    def dims(self) -> tuple[int, ...]:
        return wire.ints(self.fields, 1)

    def renamed(self, name: str) -> "Tensor":
        return self.replaced(8, [string(8, name)])

    @cached_property
    def external(self) -> dict[str, str]:
        """Its external-data entries (location, offset, length); empty for a tensor stored inline."""
        return {e.key: e.value for e in self.entries}

    @classmethod
    def int64s(cls, values: list[int]) -> "Tensor":
        """A 1-D int64 tensor in raw_data, as onnx.numpy_helper.from_array writes one."""
        return cls([integer(1, len(values)), integer(2, INT64), (9, LEN, struct.pack(f"<{len(values)}q", *values))])


class Attribute(Message):  # AttributeProto
    name, type, i = _text(1), _number(20), _number(3)

    @classmethod
    def of_int(cls, name: str, value: int) -> "Attribute":
        return cls([string(1, name), integer(3, value), integer(20, INT)])

    @classmethod
    def of_ints(cls, name: str, values: list[int]) -> "Attribute":
        return cls([string(1, name), *(integer(8, v) for v in values), integer(20, INTS)])

    @classmethod
    def of_tensor(cls, name: str, tensor: Tensor) -> "Attribute":
        return cls([string(1, name), submessage(5, tensor), integer(20, TENSOR)])


class Node(Message):  # NodeProto
    name, op_type, domain = _text(3), _text(4), _text(7)
    attributes = _Parsed(5, Attribute)

    @cached_property
    def inputs(self) -> tuple[str, ...]:
        return tuple(v.decode() for v in self.every(1))

    @cached_property
    def outputs(self) -> tuple[str, ...]:
        return tuple(v.decode() for v in self.every(2))

    def attribute(self, name: str) -> Attribute | None:
        return next((a for a in self.attributes if a.name == name), None)

    def renamed(self, rename, name: str | None = None) -> "Node":
        """The node with every input and output name t as rename(t), and its name replaced when given."""
        new = [string(1, rename(t)) for t in self.inputs] + [string(2, rename(t)) for t in self.outputs]
        new += [string(3, name)] if name is not None else []
        dropped = (1, 2, 3) if name is not None else (1, 2)
        return Node(sorted((*new, *(f for f in self.fields if f[0] not in dropped)), key=lambda f: f[0]))

    def retyped(self, op_type: str, domain: str) -> "Node":
        return self.replaced(4, [string(4, op_type)]).replaced(7, [string(7, domain)])

    def with_attributes(self, attributes: Iterable[Attribute]) -> "Node":
        return self.replaced(5, [submessage(5, a) for a in attributes])

    @classmethod
    def make(cls, op_type: str, inputs: list[str], outputs: list[str], attributes: Iterable[Attribute] = (),
             domain: str | None = None) -> "Node":
        """As onnx.helper.make_node writes one: its attributes sorted by name."""
        fields = [*(string(1, t) for t in inputs), *(string(2, t) for t in outputs), string(4, op_type)]
        fields += [submessage(5, a) for a in sorted(attributes, key=lambda a: a.name)]
        return cls(fields + ([string(7, domain)] if domain is not None else []))


class Value(Message):  # ValueInfoProto
    name = _text(1)

    def renamed(self, name: str) -> "Value":
        return self.replaced(1, [string(1, name)])

    @property
    def shape(self) -> tuple[int | str | None, ...]:
        """Its tensor type's dimensions (type.tensor_type.shape.dim): an int, a symbol, or None."""
        return tuple(dimension(Message.parse(d)) for d in walk(self, 2, 1, 2).every(1))

    @property
    def elem_type(self) -> int:
        return wire.signed(walk(self, 2, 1).last(1, 0, VARINT))

    def reshaped(self, shape: tuple[int | str | None, ...]) -> "Value":
        return self.replaced(2, [(2, LEN, tensor_type(self.elem_type, shape))])

    @classmethod
    def tensor(cls, name: str, elem_type: int, shape: tuple[int | str | None, ...]) -> "Value":
        """As onnx.helper.make_tensor_value_info writes one (a shape field even for a scalar)."""
        return cls([string(1, name), (2, LEN, tensor_type(elem_type, shape))])


def walk(message: Message, *numbers: int) -> Message:
    """The singular submessage at that path of field numbers (an empty one where a step is absent)."""
    for number in numbers:
        message = Message.parse(message.last(number, b""))
    return message


def dimension(d: Message) -> int | str | None:
    if d.last(1, kind=VARINT) is not None:
        return wire.signed(d.last(1, kind=VARINT))
    return d.last(2).decode() if d.last(2) is not None else None


def tensor_type(elem_type: int, shape: tuple[int | str | None, ...]) -> bytes:
    """A TypeProto of a tensor: elem_type and its dimensions (dim_value, dim_param, or neither)."""
    dims = [wire.encode([integer(1, d)] if isinstance(d, int) else [string(2, d)] if d is not None else [])
            for d in shape]
    shape_bytes = wire.encode((1, LEN, d) for d in dims)
    return wire.encode([(1, LEN, wire.encode([integer(1, elem_type), (2, LEN, shape_bytes)]))])


class Graph(Message):  # GraphProto
    name = _text(2)
    nodes, initializers = _Parsed(1, Node), _Parsed(5, Tensor)
    inputs, outputs = _Parsed(11, Value), _Parsed(12, Value)

    def with_nodes(self, nodes: Iterable[Node]) -> "Graph":
        return self.replaced(1, [submessage(1, n) for n in nodes])

    def with_initializers(self, initializers: Iterable[Tensor]) -> "Graph":
        return self.replaced(5, [submessage(5, t) for t in initializers])

    def with_inputs(self, inputs: Iterable[Value]) -> "Graph":
        return self.replaced(11, [submessage(11, v) for v in inputs])

    @classmethod
    def make(cls, nodes: Iterable[Node], name: str, inputs: Iterable[Value], outputs: Iterable[Value],
             initializers: Iterable[Tensor] = ()) -> "Graph":
        return cls([*(submessage(1, n) for n in nodes), string(2, name), *(submessage(5, t) for t in initializers),
                    *(submessage(11, v) for v in inputs), *(submessage(12, v) for v in outputs)])


class Model(Message):  # ModelProto
    ir_version = _number(1)
    graph, opset_imports = _Parsed(7, Graph, many=False), _Parsed(8, OpsetId)

    @property
    def functions(self) -> tuple[bytes, ...]:
        return self.every(25)

    def opset(self, domain: str = "") -> int:
        """The version it imports of `domain` ("" and "ai.onnx" both name the default one); 0 if none."""
        names = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
        return next((o.version for o in self.opset_imports if o.domain in names), 0)

    def with_graph(self, graph: Graph) -> "Model":
        return self.replaced(7, [submessage(7, graph)])

    def with_opsets(self, opsets: Iterable[OpsetId]) -> "Model":
        return self.replaced(8, [submessage(8, o) for o in opsets])

    @classmethod
    def make(cls, graph: Graph, opset_imports: Iterable[OpsetId], ir_version: int,
             functions: Iterable[bytes] = ()) -> "Model":
        """As onnx.helper.make_model(graph, opset_imports=..., ir_version=..., functions=...) writes one."""
        return cls([integer(1, ir_version), submessage(7, graph), *(submessage(8, o) for o in opset_imports),
                    *((25, LEN, f) for f in functions)])


def load_graph(path: Path) -> Model:
    """A graph file's model (its external weights stay in their files): read, not yet parsed below the top."""
    return Model.parse(path.read_bytes())
