"""onnxsim on a stage graph, kept only where it removes nodes."""
from __future__ import annotations

import onnx


def maybe_simplify(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    from onnxsim import simplify  # optional: only needed with --simplify

    simplified, ok = simplify(model)
    return simplified if ok and len(simplified.graph.node) < len(model.graph.node) else model
