"""One ONNX graph from consecutive stages of a model directory: the whole model (the baseline users run
today), or a run of resident stages that the engine executes as one session (engine/merged.py).

Stage-internal tensor and weight names are prefixed with the stage name (every block has its own
`/ln_1/...`); boundary tensors keep their global names. Weights stay in the stages' data files. Built over
the wire format (format/onnx_proto.py): a run merges its resident stages without the `onnx` package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import HermesError
from ..format.manifest import Manifest, StageSpec
from ..format.onnx_proto import GRAPH, GRAPHS, Graph, Model, Node, Tensor, load_graph, string


def renamed_stage(directory: Path, stage: StageSpec) -> Graph:
    graph = load_graph(directory / stage.graph.path).graph
    boundary = {t.name for t in (*stage.inputs, *stage.outputs)}
    rename = lambda n: n if (not n or n in boundary) else f"{stage.name}/{n}"
    if any(a.type in (GRAPH, GRAPHS) for node in graph.nodes for a in node.attributes):
        raise HermesError(f"{stage.describe()}: merging stages whose graphs have subgraphs is not supported")
    nodes = [node.renamed(rename, name=f"{stage.name}/{node.name}") for node in graph.nodes]
    return graph.with_nodes(nodes).with_initializers(t.renamed(rename(t.name)) for t in graph.initializers)


def crossing(manifest: Manifest, start: int, stop: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of stages [start, stop) taken together: the tensors they read that none of them
    makes, and the tensors they make that a later stage reads or the model gives."""
    stages, last_use = manifest.stages[start:stop], manifest.last_use()
    made = {t.name for s in stages for t in s.outputs}
    inputs = list(dict.fromkeys(t.name for s in stages for t in s.inputs if t.name not in made))
    outputs = list(dict.fromkeys(t.name for s in stages for t in s.outputs if last_use.get(t.name, -1) >= stop))
    return inputs, outputs


LAST = "/last_position"  # suffix of a head input cut to its last position inside a merged run


def cut_inputs(stage: StageSpec, made: set[str]) -> list[str]:
    """The head's [batch, sequence, E] float inputs made inside the run: what a decoding chain cuts to the
    last position before a head (engine/chain.last_position_only), cut inside the graph instead."""
    return [t.name for t in stage.inputs if t.name in made and len(t.shape) == 3 and t.dtype.startswith("float")]


def with_heads_cut(stages: tuple[StageSpec, ...], graphs: list[Graph]) -> list[Graph]:
    """Head stages that follow a block in the run read its hidden states at the last position only: a
    Slice [-1:] on the sequence axis, made once, before the first of them."""
    made = {t.name for s in stages for t in s.outputs if s.kind != "head"}
    cuts = {name for s in stages if s.kind == "head" for name in cut_inputs(s, made)}
    if not cuts:
        return graphs
    first = next(k for k, s in enumerate(stages) if s.kind == "head")
    slices, constants = [], []
    for name in sorted(cuts):
        bounds = [f"{name}{LAST}/{b}" for b in ("starts", "ends", "axes")]
        constants += [Tensor.int64s([v]).renamed(n) for v, n in zip((-1, 2 ** 63 - 1, 1), bounds)]
        slices.append(Node.make("Slice", [name, *bounds], [name + LAST]).replaced(3, [string(3, name + LAST)]))
    rename = lambda n: n + LAST if n in cuts else n
    heads = [g.with_nodes(node.renamed(rename) for node in g.nodes) for g in graphs[first:]]
    heads[0] = heads[0].with_nodes([*slices, *heads[0].nodes]).with_initializers([*heads[0].initializers, *constants])
    return graphs[:first] + heads


def merged_model(directory: Path, manifest: Manifest, start: int = 0, stop: int | None = None,
                 check: Callable[[StageSpec, list[str], list[str]], None] = lambda stage, inputs, outputs: None,
                 last_position_heads: bool = False) -> bytes:
    """Stages [start, stop) (half-open; all of them by default) as one serialized model, weights as external
    data relative to `directory`; `check` sees each stage's graph input and output names first.
    last_position_heads: head stages after blocks see the last position only, as in a decoding chain."""
    stop = len(manifest.stages) if stop is None else stop
    graphs = [renamed_stage(directory, s) for s in manifest.stages[start:stop]]
    for stage, graph in zip(manifest.stages[start:stop], graphs):
        check(stage, [v.name for v in graph.inputs], [v.name for v in graph.outputs])
    if last_position_heads:
        graphs = with_heads_cut(manifest.stages[start:stop], graphs)
    first = load_graph(directory / manifest.stages[start].graph.path)
    io = {v.name: v for g in graphs for v in (*g.inputs, *g.outputs)}
    inputs, outputs = crossing(manifest, start, stop)
    merged = Graph.make([n for g in graphs for n in g.nodes], "whole_model" if (start, stop) == (
        0, len(manifest.stages)) else f"stages_{start}_{stop}", [io[n] for n in inputs], [io[n] for n in outputs],
        [t for g in graphs for t in g.initializers])
    return Model.make(merged, first.opset_imports, first.ir_version).to_bytes()


def merge_stages(directory: Path, manifest: Manifest, out_name: str = "whole_model.onnx") -> Path:
    """Writes DIR/out_name, whose weights point into the stages' data files (no bytes are copied)."""
    path = directory / out_name
    path.write_bytes(merged_model(directory, manifest))
    return path
