"""Cutting any ONNX model into stages of the hermes-ort format (needs onnx only: it runs on the board).

The graph is read without its external data; weights are then copied one tensor at a time from the
source files into each stage's data file, so a model over 2 GB never sits in memory whole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper, shape_inference

from ..format import manifest as manifest_io
from .cuts import BLOCK_NAME, Node, balanced, by_block_names, by_cut_tensors
from ..errors import SplitError
from ..format.manifest import Manifest
from ..format.publish import building
from ..format.stage_files import tensor_spec, write_stage
from ..format.weights import WeightWriter, source_reader


@dataclass(frozen=True)
class SplitRequest:
    """How to cut: `stages` forces a balanced cut into that many; `cuts` names the boundary tensors."""

    stages: int | None = None
    cuts: tuple[str, ...] = ()


def split_model(model_path: str | os.PathLike, out: str | os.PathLike,
                request: SplitRequest = SplitRequest()) -> Manifest:
    """Writes a model directory at `out` whose chained stages compute what the model computes."""
    model_path = Path(model_path)
    model = read_graph(model_path)
    graph = model.graph
    free = constant_nodes(graph)
    placed = [i for i in range(len(graph.node)) if i not in free]
    nodes = describe_nodes(graph, placed)
    assignment, names = assign(nodes, request)
    with building(out) as tmp:
        writer, read, specs = WeightWriter(tmp), source_reader(model_path.parent), []
        for k, name in sorted(names.items()):
            stage_graph = stage_model(model, placed, free, assignment, k)
            if stage_graph is not None:
                specs.append(write_stage(stage_graph, tmp, name, kind_of(name), writer, read))
        manifest = Manifest(
            family="onnx", config={"source": model_path.name,
                                   "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}},
            inputs=tuple(tensor_spec(v) for v in graph_inputs(graph)),
            outputs=tuple(tensor_spec(v) for v in graph.output), stages=tuple(specs),
            extra={"source": str(model_path)},
        )
        manifest_io.save(manifest, tmp)
    return manifest


def read_graph(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise SplitError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise SplitError(f"{path} is not a readable ONNX model: {e}") from e
    try:
        return shape_inference.infer_shapes(model)
    except Exception as e:  # inference errors come from C++ with varied types
        raise SplitError(f"{path}: shape inference failed, stage boundaries need types: {e}") from e


def node_inputs(node: onnx.NodeProto) -> tuple[str, ...]:
    """Tensors a node reads, including those its subgraphs (If/Loop bodies) take from the outer scope."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {t for n in sub.node for t in n.output} | {t.name for t in sub.initializer} | {
                t.name for t in sub.input}
            names += [t for n in sub.node for t in node_inputs(n) if t not in inner]
    return tuple(dict.fromkeys(names))


def constant_nodes(graph: onnx.GraphProto) -> set[int]:
    """Nodes that read only weights and constants (Constant, Identity of a weight): cloned into each stage
    that uses them instead of passing their outputs between stages."""
    known, free = {t.name for t in graph.initializer}, set()
    for i, n in enumerate(graph.node):
        if all(t in known for t in node_inputs(n)):
            free.add(i)
            known.update(n.output)
    return free


def describe_nodes(graph: onnx.GraphProto, placed: list[int]) -> list[Node]:
    sizes = {t.name: initializer_bytes(t) for t in graph.initializer}
    seen: set[str] = set()
    nodes = []
    for i in placed:
        n = graph.node[i]
        first_use = [t for t in node_inputs(n) if t in sizes and t not in seen]
        seen.update(first_use)
        nodes.append(Node(n.name or f"{n.op_type}_{i}", node_inputs(n), tuple(n.output),
                          sum(sizes[t] for t in first_use)))
    return nodes


def initializer_bytes(t: onnx.TensorProto) -> int:
    length = {e.key: e.value for e in t.external_data}.get("length")
    if length is not None:
        return int(length)
    count = 1
    for d in t.dims:
        count *= d
    return count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def assign(nodes: list[Node], request: SplitRequest) -> tuple[list[int], dict[int, str]]:
    """Stage index per node, and a name per stage: embeddings / block_NN / head where blocks were found
    by name, stage_NN otherwise."""
    if request.cuts:
        return numbered(by_cut_tensors(nodes, list(request.cuts)))
    if request.stages:
        return numbered(balanced(nodes, request.stages))
    found = by_block_names(nodes)
    if found is None:
        return numbered(balanced(nodes, min(len(nodes), max(2, min(8, len(nodes) // 50)))))
    head = max(found)
    names = {k: "embeddings" if k == 0 else "head" if k == head and not is_block(nodes, found, k)
             else f"block_{k - 1:02d}" for k in set(found)}
    return found, names


def numbered(stages: list[int]) -> tuple[list[int], dict[int, str]]:
    return stages, {k: f"stage_{k:02d}" for k in set(stages)}


def is_block(nodes: list[Node], stages: list[int], k: int) -> bool:
    return any(BLOCK_NAME.search(n.name) for n, s in zip(nodes, stages) if s == k)


def kind_of(name: str) -> str:
    return {"embeddings": "embeddings", "head": "head"}.get(name, "block" if name.startswith("block") else "graph")


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in initializers]


def stage_model(model: onnx.ModelProto, placed: list[int], free: set[int], assignment: list[int],
                k: int) -> onnx.ModelProto | None:
    """The stage-k graph: its nodes, cloned constants, boundary inputs/outputs and the weights it uses."""
    graph = model.graph
    mine = [placed[j] for j, s in enumerate(assignment) if s == k]
    later = {t for j, s in enumerate(assignment) if s > k for t in node_inputs(graph.node[placed[j]])}
    produced = {t for i in mine for t in graph.node[i].output}
    outputs = [t for t in dict.fromkeys(t for i in mine for t in graph.node[i].output)
               if t in later or t in {o.name for o in graph.output}]
    if not outputs:
        return None
    consumed = {t for i in mine for t in node_inputs(graph.node[i])}
    constants = []
    for i in sorted(free, reverse=True):  # closure: constants that feed constants this stage needs
        if set(graph.node[i].output) & consumed:
            constants.append(i)
            consumed.update(node_inputs(graph.node[i]))
    produced |= {t for i in constants for t in graph.node[i].output}
    weights = [t for t in graph.initializer if t.name in consumed]
    boundary = [t for t in dict.fromkeys(t for i in mine for t in node_inputs(graph.node[i]))
                if t not in produced and t not in {w.name for w in weights}]
    types = value_infos(graph)
    missing = [t for t in boundary + outputs if t not in types]
    if missing:
        raise SplitError(f"stage {k}: no type known for boundary tensors {missing} (shape inference gave none)")
    body = helper.make_graph([graph.node[i] for i in sorted(constants + mine)], f"{graph.name}_stage{k}",
                             [types[t] for t in boundary], [types[t] for t in outputs], initializer=weights)
    return helper.make_model(body, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             functions=list(model.functions))


def value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {v.name: v for v in [*graph.input, *graph.value_info, *graph.output] if v.type.HasField("tensor_type")}
