"""Stage graphs read and templates, merged graphs written over the wire format (format/wire.py,
format/onnx_proto.py): the bytes onnx's own helpers write for them; malformed bytes are refused by name."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hermes_ort.convert import convert_gguf
from hermes_ort.engine.templates import canonicalize
from hermes_ort.errors import StageError
from hermes_ort.format import manifest as manifest_io
from hermes_ort.format import wire
from hermes_ort.format.onnx_proto import Attribute, Model, Node, Tensor, Value, load_graph
from hermes_ort.graphs.merge import crossing, merged_model

from tiny_gguf import TinyConfig, write_tiny_gguf


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("proto")
    write_tiny_gguf(root / "tiny.gguf", TinyConfig(layers=2))
    return convert_gguf(root / "tiny.gguf", root / "model", "native", 0).directory


@pytest.fixture(params=["tiny-gpt2", "native"])
def model_dir(request, exported, native):
    return native if request.param == "native" else exported(request.param).directory


def onnx_template(path) -> bytes:
    """The template as onnx's helpers build it: inputs, outputs and external weights renamed by position,
    node names cleared, external weights declared as inputs."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    external = [t for t in graph.initializer if t.external_data]
    rename = {v.name: f"in_{k}" for k, v in enumerate(graph.input)}
    rename |= {v.name: f"out_{k}" for k, v in enumerate(graph.output)}
    rename |= {t.name: f"w_{k}" for k, t in enumerate(external)}
    nodes = []
    for n in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.input[:], copy.output[:], copy.name = [rename.get(t, t) for t in n.input], [
            rename.get(t, t) for t in n.output], ""
        nodes.append(copy)

    def retyped(v):
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(v)
        copy.name = rename[v.name]
        return copy

    inputs = [retyped(v) for v in graph.input] + [
        helper.make_tensor_value_info(rename[t.name], t.data_type, tuple(t.dims)) for t in external]
    body = helper.make_graph(nodes, "template", inputs, [retyped(v) for v in graph.output],
                             initializer=[t for t in graph.initializer if not t.external_data])
    return helper.make_model(body, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             functions=list(model.functions)).SerializeToString()


def test_stage_graphs_read_as_onnx_reads_them_and_write_back_as_it_writes_them(model_dir):
    for stage in manifest_io.load(model_dir).stages:
        model, reference = load_graph(model_dir / stage.graph.path), onnx.load(
            str(model_dir / stage.graph.path), load_external_data=False)
        graph = model.graph
        assert [(n.op_type, n.inputs, n.outputs) for n in graph.nodes] == [
            (n.op_type, tuple(n.input), tuple(n.output)) for n in reference.graph.node]
        assert [(t.name, t.dims, t.data_type, t.external) for t in graph.initializers] == [
            (t.name, tuple(t.dims), t.data_type, {e.key: e.value for e in t.external_data})
            for t in reference.graph.initializer]
        assert [(v.name, v.shape) for v in graph.inputs] == [(v.name, tuple(
            d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim))
            for v in reference.graph.input]
        rebuilt = Model.make(graph.with_nodes(n.renamed(str.upper) for n in graph.nodes), model.opset_imports,
                             model.ir_version, model.functions)
        for n in reference.graph.node:
            n.input[:], n.output[:] = [t.upper() for t in n.input], [t.upper() for t in n.output]
        assert rebuilt.to_bytes() == helper.make_model(reference.graph, opset_imports=list(reference.opset_import),
                                                       ir_version=reference.ir_version).SerializeToString()


def test_templates_are_the_bytes_onnx_writes_for_them(model_dir):
    for stage in manifest_io.load(model_dir).stages:
        form = canonicalize(model_dir, stage)
        assert form.model == onnx_template(model_dir / stage.graph.path), stage.name
        assert form.key == hashlib.sha256(form.model).hexdigest()


def test_a_merged_run_is_the_model_onnx_writes_for_it(native):
    manifest = manifest_io.load(native)
    first = onnx.load(str(native / manifest.stages[0].graph.path), load_external_data=False)
    graphs = []
    for stage in manifest.stages[:3]:
        graph = onnx.load(str(native / stage.graph.path), load_external_data=False).graph
        boundary = {t.name for t in (*stage.inputs, *stage.outputs)}
        rename = lambda n: n if (not n or n in boundary) else f"{stage.name}/{n}"
        for node in graph.node:
            node.name = f"{stage.name}/{node.name}"
            node.input[:], node.output[:] = [rename(n) for n in node.input], [rename(n) for n in node.output]
        for t in graph.initializer:
            t.name = rename(t.name)
        graphs.append(graph)
    io = {v.name: v for g in graphs for v in (*g.input, *g.output)}
    inputs, outputs = crossing(manifest, 0, 3)
    want = helper.make_model(helper.make_graph(
        [n for g in graphs for n in g.node], "stages_0_3", [io[n] for n in inputs], [io[n] for n in outputs],
        initializer=[t for g in graphs for t in g.initializer]), opset_imports=list(first.opset_import),
        ir_version=first.ir_version)
    assert merged_model(native, manifest, 0, 3) == want.SerializeToString()


def test_built_messages_read_back_through_onnx():
    node = Node.make("Gemm", ["a", "b"], ["y"], [Attribute.of_int("transB", 1), Attribute.of_int("axis", -1),
                                                 Attribute.of_ints("perm", [1, 0]),
                                                 Attribute.of_tensor("value", Tensor.int64s([-1, 8]))])
    read = onnx.NodeProto.FromString(node.to_bytes())
    assert read == helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, axis=-1, perm=[1, 0],
                                    value=numpy_helper.from_array(np.array([-1, 8], np.int64)))
    parsed = Node.parse(read.SerializeToString())
    assert [a.name for a in parsed.attributes] == ["axis", "perm", "transB", "value"]  # sorted, as make_node does
    assert (parsed.attribute("axis").i, parsed.attribute("transB").i) == (-1, 1)
    value = Value.tensor("x", TensorProto.FLOAT, ("batch", 4, None))
    assert onnx.ValueInfoProto.FromString(value.to_bytes()) == helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 4, None])
    assert value.shape == ("batch", 4, None) and value.reshaped((4, "batch")).shape == (4, "batch")


def test_varints_packed_fields_and_field_order():
    assert wire.parse(wire.encode([(3, wire.VARINT, (-2) & (2**64 - 1))])) == ((3, wire.VARINT, 2**64 - 2),)
    packed = wire.encode([(1, wire.LEN, wire.put_varint(5) + wire.put_varint(300) + wire.put_varint(-1))])
    unpacked = wire.encode([(1, wire.VARINT, 5), (1, wire.VARINT, 300), (1, wire.VARINT, -1)])
    assert wire.ints(wire.parse(packed), 1) == wire.ints(wire.parse(unpacked), 1) == (5, 300, -1)
    fields = ((1, wire.LEN, b"a"), (4, wire.LEN, b"op"), (7, wire.LEN, b"d"))
    assert [f[0] for f in wire.with_fields(fields, 5, [(5, wire.LEN, b"x"), (5, wire.LEN, b"y")])] == [1, 4, 5, 5, 7]


@pytest.mark.parametrize("data, message", [
    (b"\x0a\x05ab", "needs 5 bytes"),  # a string longer than the message
    (b"\x08\xff\xff", "truncated or overlong varint"),
    (b"\x0b", "wire type 3"),  # a group
    (b"\x00\x01", "field number 0"),
])
def test_malformed_bytes_are_refused(data, message):
    with pytest.raises(wire.WireError, match=message):
        wire.parse(data)


def test_a_field_of_the_wrong_wire_type_is_refused():
    node = Node(wire.parse(wire.encode([(4, wire.VARINT, 7)])))  # op_type as a number
    with pytest.raises(wire.WireError, match="Node field 4 does not have wire type 2"):
        node.op_type


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\x0b" + b[1:]],
                         ids=["cut-short", "a-group-for-ir_version"])
def test_a_damaged_graph_is_named_not_used(native, tmp_path, damage):
    directory = tmp_path / "model"
    shutil.copytree(native, directory)
    stage = manifest_io.load(directory).stages[1]
    path = directory / stage.graph.path
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StageError, match=f"stage '{stage.name}' .*: cannot load .*{path.name}"):
        canonicalize(directory, stage)
