"""Writing one stage of a model directory: its graph file, its data file, and the StageSpec that states them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from onnx import helper

from .manifest import FileSpec, StageSpec, TensorSpec
from .weights import WeightWriter


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """TensorSpec of a graph input/output: numpy dtype name, symbolic axes kept by name."""
    t = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
    shape = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{value.name}_dim{i}")
        for i, d in enumerate(t.shape.dim)
    )
    return TensorSpec(value.name, dtype, shape)


def write_stage(model: onnx.ModelProto, directory: Path, name: str, kind: str,
                writer: WeightWriter, read: Callable) -> StageSpec:
    """Writes DIR/name.onnx with weights in DIR/name.data (or shared files) and describes them."""
    initializers = {t.name for t in model.graph.initializer}
    data_files = writer.externalize(model.graph, f"{name}.data", read)
    graph_path = f"{name}.onnx"
    onnx.save_model(model, directory / graph_path)
    return StageSpec(
        name=name, kind=kind, graph=FileSpec.of(directory, graph_path),
        weights=tuple(FileSpec.of(directory, p) for p in data_files),
        inputs=tuple(tensor_spec(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(tensor_spec(v) for v in model.graph.output),
    )
