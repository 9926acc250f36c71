"""One whole-model ONNX graph from a model directory's stages: the baseline users run today.

Stage-internal tensor and weight names are prefixed with the stage name (every block has its own
`/ln_1/...`); boundary tensors keep their global names. Weights stay in the stages' data files.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from ..errors import HermesError
from ..format.manifest import Manifest, StageSpec


def renamed_stage(directory: Path, stage: StageSpec) -> onnx.GraphProto:
    graph = onnx.load(str(directory / stage.graph.path), load_external_data=False).graph
    boundary = {t.name for t in (*stage.inputs, *stage.outputs)}
    rename = lambda n: n if (not n or n in boundary) else f"{stage.name}/{n}"
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise HermesError(f"{stage.describe()}: merging stages whose graphs have subgraphs is not supported")
        node.name = f"{stage.name}/{node.name}"
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for t in graph.initializer:
        t.name = rename(t.name)
    return graph


def merge_stages(directory: Path, manifest: Manifest, out_name: str = "whole_model.onnx") -> Path:
    """Writes DIR/out_name, whose weights point into the stages' data files (no bytes are copied)."""
    graphs = [renamed_stage(directory, s) for s in manifest.stages]
    first = onnx.load(str(directory / manifest.stages[0].graph.path), load_external_data=False)
    io = {v.name: v for g in graphs for v in (*g.input, *g.output)}
    merged = helper.make_graph([n for g in graphs for n in g.node], "whole_model",
                               [io[t.name] for t in manifest.inputs], [io[t.name] for t in manifest.outputs],
                               initializer=[t for g in graphs for t in g.initializer])
    model = helper.make_model(merged, opset_imports=list(first.opset_import), ir_version=first.ir_version)
    path = directory / out_name
    onnx.save_model(model, path)
    return path
