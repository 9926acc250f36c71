"""A few lines over onnx.helper for writing graphs by hand: nodes with generated output names, constants
as initializers, and a model with the opsets ORT's CPU kernels need (ONNX 17 and com.microsoft)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


class GraphBuilder:
    """Collects nodes and initializers; every op returns its output name(s)."""

    def __init__(self, name: str):
        self.name, self.nodes, self.initializers, self.count = name, [], [], 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        names = outputs if isinstance(outputs, list) else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, np.int64), "shape")

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=OPSETS, producer_name="hermes-ort convert",
                                 ir_version=9)


def value(name: str, dtype, shape: list) -> onnx.ValueInfoProto:
    """A graph input or output: numpy dtype, shape with symbolic axes as strings."""
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


FLOAT_MIN = float(np.finfo(np.float32).min)
BOOL = TensorProto.BOOL
FLOAT = TensorProto.FLOAT
