"""A template graph that takes its matrix weights transposed, W^T stored [N, K] (format/batched_layout.py).

A template takes its weights as inputs, so ORT cannot prepack them, and for more than one row MLAS packs
an input matrix B on every call: a 1024 x 4096 MatMul at 8 rows took 5.27 ms, against 1.67 ms as
(W^T x^T)^T, where the packed operand is the small x (2-core EPYC, interleaved medians): `rewrite`.
One row reads the same bytes as x (W^T)^T, Gemm(transB=1) or FusedMatMul(transB=1), where MLAS's one-row
kernel takes dot products along W^T's rows: a GPT-2 medium block at one row ran 2.95-3.79 ms so, against
3.48-4.53 as exported (a GEMV along W's rows) and 3.26-4.13 prepacked, in three interleaved runs
(`rewrite_one_row`). A stage reading the layout holds a session of each and runs the one its rows need.

Rewritten here: Gemm(x, W, c) with transA = transB = 0 and a 1-D or no c, and MatMul(x, W) with W 2-D,
where W is a weight input used by nothing else. Each becomes Gemm(W^T, x, transB=1) and a Transpose (a
MatMul also reshapes x to rows and back); for one row, Gemm(x, W^T, transB=1) and FusedMatMul(x, W^T,
transB=1).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def transposable(model: onnx.ModelProto, weights: dict[str, tuple[int, ...]]) -> list[str]:
    """The weight inputs (name -> shape) that every use reads as the B of a rewritable Gemm or MatMul."""
    if opset(model) < 13:  # Unsqueeze with axes as an input
        return []
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, k))
    return [name for name, shape in weights.items() if len(shape) == 2 and uses.get(name) and all(
        k == 1 and rewritable(node) for node, k in uses[name])]


def rewritable(node: onnx.NodeProto) -> bool:
    if node.op_type == "MatMul":
        return True
    attrs = {a.name: a for a in node.attribute}
    return node.op_type == "Gemm" and all(attrs[t].i == 0 for t in ("transA", "transB") if t in attrs)


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def rewrite(template: bytes, names: list[str]) -> bytes:
    """The template with each named weight input declared [N, K] and read through rewritten nodes."""
    model = onnx.load_from_string(template)
    graph, chosen = model.graph, set(names)
    nodes = []
    for k, node in enumerate(graph.node):
        if len(node.input) > 1 and node.input[1] in chosen:
            nodes += gemm_rewrite(node, k) if node.op_type == "Gemm" else matmul_rewrite(node, k, shape_of(graph, node.input[1]))
        else:
            nodes.append(node)
    swap_declared_shapes(graph, chosen)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model.SerializeToString()


def rewrite_one_row(template: bytes, names: list[str]) -> bytes:
    """The template with each named weight input declared [N, K] and read as the transposed B of its Gemm
    or of a FusedMatMul (ORT's MatMul with transB) in place of its MatMul."""
    model = onnx.load_from_string(template)
    graph, chosen = model.graph, set(names)
    for node in graph.node:
        if len(node.input) > 1 and node.input[1] in chosen:
            if node.op_type == "MatMul":
                node.op_type, node.domain = "FusedMatMul", "com.microsoft"
            kept = [a for a in node.attribute if a.name != "transB"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("transB", 1)])
    swap_declared_shapes(graph, chosen)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def swap_declared_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    for value in graph.input:
        if value.name in names:
            dims = value.type.tensor_type.shape.dim
            dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value


def shape_of(graph: onnx.GraphProto, name: str) -> tuple[int, int]:
    value = next(v for v in graph.input if v.name == name)
    return tuple(d.dim_value for d in value.type.tensor_type.shape.dim)


def gemm_rewrite(node: onnx.NodeProto, k: int) -> list[onnx.NodeProto]:
    """x W + c = ((W^T) x^T + c[:, None])^T: Gemm's C broadcasts along rows, so c becomes a column."""
    x, w = node.input[0], node.input[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in ("alpha", "beta")}
    out, p = node.output[0], f"hermes_t{k}"
    made = []
    inputs = [w, x]
    if len(node.input) > 2 and node.input[2]:
        made.append(helper.make_node("Constant", [], [f"{p}_axis"], value=numpy_helper.from_array(np.array([1], np.int64))))
        made.append(helper.make_node("Unsqueeze", [node.input[2], f"{p}_axis"], [f"{p}_c"]))
        inputs.append(f"{p}_c")
    made.append(helper.make_node("Gemm", inputs, [f"{p}_yt"], transB=1, **attrs))
    made.append(helper.make_node("Transpose", [f"{p}_yt"], [out], perm=[1, 0]))
    return made


def matmul_rewrite(node: onnx.NodeProto, k: int, shape: tuple[int, int]) -> list[onnx.NodeProto]:
    """x W for x of any rank [..., K]: rows of x, Gemm(W^T, rows, transB=1), transposed back and reshaped
    to [..., N]."""
    x, w = node.input[0], node.input[1]
    rows_width, out_width = shape  # W as the stage declares it, [K, N]
    out, p = node.output[0], f"hermes_t{k}"
    const = lambda name, values: helper.make_node("Constant", [], [name],
                                                  value=numpy_helper.from_array(np.array(values, np.int64)))
    return [const(f"{p}_rows_shape", [-1, rows_width]), helper.make_node("Reshape", [x, f"{p}_rows_shape"], [f"{p}_rows"]),
            helper.make_node("Gemm", [w, f"{p}_rows"], [f"{p}_yt"], transB=1),
            helper.make_node("Transpose", [f"{p}_yt"], [f"{p}_y2"], perm=[1, 0]),
            helper.make_node("Shape", [x], [f"{p}_xs"]), const(f"{p}_start", [0]), const(f"{p}_end", [-1]),
            helper.make_node("Slice", [f"{p}_xs", f"{p}_start", f"{p}_end"], [f"{p}_lead"]),
            const(f"{p}_n", [out_width]),
            helper.make_node("Concat", [f"{p}_lead", f"{p}_n"], [f"{p}_shape"], axis=0),
            helper.make_node("Reshape", [f"{p}_y2", f"{p}_shape"], [out])]
