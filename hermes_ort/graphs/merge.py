"""One ONNX graph from consecutive stages of a model directory: the whole model (the baseline users run
today), or a run of resident stages that the engine executes as one session (engine/merged.py).

Stage-internal tensor and weight names are prefixed with the stage name (every block has its own
`/ln_1/...`); boundary tensors keep their global names. Weights stay in the stages' data files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

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


def crossing(manifest: Manifest, start: int, stop: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of stages [start, stop) taken together: the tensors they read that none of them
    makes, and the tensors they make that a later stage reads or the model gives."""
    stages, last_use = manifest.stages[start:stop], manifest.last_use()
    made = {t.name for s in stages for t in s.outputs}
    inputs = list(dict.fromkeys(t.name for s in stages for t in s.inputs if t.name not in made))
    outputs = list(dict.fromkeys(t.name for s in stages for t in s.outputs if last_use.get(t.name, -1) >= stop))
    return inputs, outputs


def merged_model(directory: Path, manifest: Manifest, start: int = 0, stop: int | None = None,
                 check: Callable[[StageSpec, list[str], list[str]], None] = lambda stage, inputs, outputs: None
                 ) -> onnx.ModelProto:
    """Stages [start, stop) (half-open; all of them by default) as one model, weights as external data
    relative to `directory`; `check` sees each stage's graph input and output names first."""
    stop = len(manifest.stages) if stop is None else stop
    graphs = [renamed_stage(directory, s) for s in manifest.stages[start:stop]]
    for stage, graph in zip(manifest.stages[start:stop], graphs):
        check(stage, [v.name for v in graph.input], [v.name for v in graph.output])
    first = onnx.load(str(directory / manifest.stages[start].graph.path), load_external_data=False)
    io = {v.name: v for g in graphs for v in (*g.input, *g.output)}
    inputs, outputs = crossing(manifest, start, stop)
    merged = helper.make_graph([n for g in graphs for n in g.node], "whole_model" if (start, stop) == (
        0, len(manifest.stages)) else f"stages_{start}_{stop}", [io[n] for n in inputs], [io[n] for n in outputs],
        initializer=[t for g in graphs for t in g.initializer])
    return helper.make_model(merged, opset_imports=list(first.opset_import), ir_version=first.ir_version)


def merge_stages(directory: Path, manifest: Manifest, out_name: str = "whole_model.onnx") -> Path:
    """Writes DIR/out_name, whose weights point into the stages' data files (no bytes are copied)."""
    path = directory / out_name
    onnx.save_model(merged_model(directory, manifest), path)
    return path
