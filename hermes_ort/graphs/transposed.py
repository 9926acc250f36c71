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

from ..format.onnx_proto import Attribute, Graph, Model, Node, OpsetId, Tensor


def transposable(template: bytes, weights: dict[str, tuple[int, ...]]) -> list[str]:
    """The weight inputs (name -> shape) that every use reads as the B of a rewritable Gemm or MatMul."""
    model = Model.parse(template)
    if model.opset() < 13:  # Unsqueeze with axes as an input
        return []
    uses: dict[str, list[tuple[Node, int]]] = {}
    for node in model.graph.nodes:
        for k, name in enumerate(node.inputs):
            uses.setdefault(name, []).append((node, k))
    return [name for name, shape in weights.items() if len(shape) == 2 and uses.get(name) and all(
        k == 1 and rewritable(node) for node, k in uses[name])]


def rewritable(node: Node) -> bool:
    if node.op_type == "MatMul":
        return True
    attrs = {a.name: a for a in node.attributes}
    return node.op_type == "Gemm" and all(attrs[t].i == 0 for t in ("transA", "transB") if t in attrs)


def rewrite(template: bytes, names: list[str]) -> bytes:
    """The template with each named weight input declared [N, K] and read through rewritten nodes."""
    model = Model.parse(template)
    graph, chosen = model.graph, set(names)
    nodes = []
    for k, node in enumerate(graph.nodes):
        if len(node.inputs) > 1 and node.inputs[1] in chosen:
            nodes += gemm_rewrite(node, k) if node.op_type == "Gemm" else matmul_rewrite(
                node, k, shape_of(graph, node.inputs[1]))
        else:
            nodes.append(node)
    return model.with_graph(swap_declared_shapes(graph.with_nodes(nodes), chosen)).to_bytes()


def rewrite_one_row(template: bytes, names: list[str]) -> bytes:
    """The template with each named weight input declared [N, K] and read as the transposed B of its Gemm
    or of a FusedMatMul (ORT's MatMul with transB) in place of its MatMul."""
    model = Model.parse(template)
    graph, chosen = model.graph, set(names)
    nodes = [one_row_node(n) if len(n.inputs) > 1 and n.inputs[1] in chosen else n for n in graph.nodes]
    model = model.with_graph(swap_declared_shapes(graph.with_nodes(nodes), chosen))
    if model.opset("com.microsoft") == 0:
        model = model.with_opsets([*model.opset_imports, OpsetId.make("com.microsoft", 1)])
    return model.to_bytes()


def one_row_node(node: Node) -> Node:
    """Gemm(x, W^T, transB=1), or FusedMatMul(x, W^T, transB=1) for a MatMul."""
    if node.op_type == "MatMul":
        node = node.retyped("FusedMatMul", "com.microsoft")
    return node.with_attributes([a for a in node.attributes if a.name != "transB"] + [Attribute.of_int("transB", 1)])


def swap_declared_shapes(graph: Graph, names: set[str]) -> Graph:
    swapped = lambda v: v.reshaped((v.shape[1], v.shape[0], *v.shape[2:]))
    return graph.with_inputs(swapped(v) if v.name in names else v for v in graph.inputs)


def shape_of(graph: Graph, name: str) -> tuple[int, int]:
    return next(v for v in graph.inputs if v.name == name).shape


def constant(name: str, values: list[int]) -> Node:
    return Node.make("Constant", [], [name], [Attribute.of_tensor("value", Tensor.int64s(values))])


def gemm_rewrite(node: Node, k: int) -> list[Node]:
    """x W + c = ((W^T) x^T + c[:, None])^T: Gemm's C broadcasts along rows, so c becomes a column."""
    x, w = node.inputs[0], node.inputs[1]
    attrs = [a for a in node.attributes if a.name in ("alpha", "beta")]
    out, p = node.outputs[0], f"hermes_t{k}"
    made = []
    inputs = [w, x]
    if len(node.inputs) > 2 and node.inputs[2]:
        made.append(constant(f"{p}_axis", [1]))
        made.append(Node.make("Unsqueeze", [node.inputs[2], f"{p}_axis"], [f"{p}_c"]))
        inputs.append(f"{p}_c")
    made.append(Node.make("Gemm", inputs, [f"{p}_yt"], [*attrs, Attribute.of_int("transB", 1)]))
    made.append(Node.make("Transpose", [f"{p}_yt"], [out], [Attribute.of_ints("perm", [1, 0])]))
    return made


def matmul_rewrite(node: Node, k: int, shape: tuple[int, int]) -> list[Node]:
    """x W for x of any rank [..., K]: rows of x, Gemm(W^T, rows, transB=1), transposed back and reshaped
    to [..., N]."""
    x, w = node.inputs[0], node.inputs[1]
    rows_width, out_width = shape  # W as the stage declares it, [K, N]
    out, p = node.outputs[0], f"hermes_t{k}"
    return [constant(f"{p}_rows_shape", [-1, rows_width]), Node.make("Reshape", [x, f"{p}_rows_shape"], [f"{p}_rows"]),
            Node.make("Gemm", [w, f"{p}_rows"], [f"{p}_yt"], [Attribute.of_int("transB", 1)]),
            Node.make("Transpose", [f"{p}_yt"], [f"{p}_y2"], [Attribute.of_ints("perm", [1, 0])]),
            Node.make("Shape", [x], [f"{p}_xs"]), constant(f"{p}_start", [0]), constant(f"{p}_end", [-1]),
            Node.make("Slice", [f"{p}_xs", f"{p}_start", f"{p}_end"], [f"{p}_lead"]),
            constant(f"{p}_n", [out_width]),
            Node.make("Concat", [f"{p}_lead", f"{p}_n"], [f"{p}_shape"], [Attribute.of_int("axis", 0)]),
            Node.make("Reshape", [f"{p}_y2", f"{p}_shape"], [out])]
