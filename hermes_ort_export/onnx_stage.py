"""torch.onnx.export of one stage module (legacy TorchScript exporter, opset 17)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from .family import StagePlan

OPSET = 17


def run_torch(plan: StagePlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = plan.module(*(tensors[n] for n in plan.inputs))
    return dict(zip(plan.outputs, out if isinstance(out, tuple) else (out,)))


def export_stage(plan: StagePlan, tensors: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The stage as an ONNX model with its weights inline (a stage is far below protobuf's 2 GB)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python ints in shapes are expected here
        torch.onnx.export(plan.module, tuple(tensors[n] for n in plan.inputs), buffer,
                          input_names=list(plan.inputs), output_names=list(plan.outputs),
                          dynamic_axes=plan.axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    return plan.postprocess(model) if plan.postprocess else model


def as_torch(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
