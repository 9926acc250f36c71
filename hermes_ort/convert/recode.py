"""Rewrite the MatMulNBits nodes ORT's quantizer made with the codes of `block_codes` (why: see there).

ORT's quantizer still decides which MatMuls become MatMulNBits and lays the nodes out; this pass only
replaces each node's codes and scales, and for `minmax` adds the offsets' term:
y = MatMulNBits(x) + ReduceSum(blocks of x) @ offsets, a few small nodes beside the kernel.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .block_codes import BlockCodes, minmax_codes, symmetric_codes

SCHEMES = ("minmax", "symmetric")


def matmul_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The constant [K, N] right-hand side of each MatMul, by initializer name (taken before quantizing)."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def recode(model: onnx.ModelProto, weights: dict[str, np.ndarray], bits: int, block: int, scheme: str) -> None:
    """In place. A weight whose K is not a multiple of the block (ORT padded it) keeps ORT's codes; `minmax`
    needs opset 13 (ReduceSum's axes as an input) and falls back to `symmetric` below it."""
    graph = model.graph
    inits = {t.name: i for i, t in enumerate(graph.initializer)}
    minmax = scheme == "minmax" and opset_of(model) >= 13
    nodes = []
    for node in graph.node:
        nodes.append(node)
        weight = weights.get(node.input[1].removesuffix(f"_Q{bits}")) if node.op_type == "MatMulNBits" else None
        if weight is None or weight.shape[0] % block:
            continue
        codes = (minmax_codes if minmax else symmetric_codes)(weight, bits, block)
        for name, array in ((node.input[1], codes.codes), (node.input[2], codes.scales)):
            graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(array, name))
        if codes.offsets is not None:
            nodes += with_offsets(model, node, codes, block)
    del graph.node[:]
    graph.node.extend(nodes)


def with_offsets(model: onnx.ModelProto, node: onnx.NodeProto, codes: BlockCodes, block: int) -> list:
    """The nodes that add blocksum(x) @ offsets to `node`'s output."""
    x, y, base = node.input[0], node.output[0], node.input[1]
    offsets = f"{base}_offsets"
    node.output[0] = f"{y}_codes"
    k_blocks = codes.scales.shape[1]
    model.graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(codes.offsets.T), offsets),
        numpy_helper.from_array(np.array([k_blocks, block], np.int64), f"{base}_block_shape"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{base}_last_axis")])
    lead, shape, sums = f"{base}_lead", f"{base}_blocked_shape", f"{base}_block_sums"
    if opset_of(model) >= 15:
        heads = [("Shape", [x], lead, {"end": -1})]
    else:
        model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{base}_first_axis"))
        heads = [("Shape", [x], f"{base}_shape", {}),
                 ("Slice", [f"{base}_shape", f"{base}_first_axis", f"{base}_last_axis"], lead, {})]
    steps = heads + [
        ("Concat", [lead, f"{base}_block_shape"], shape, {"axis": 0}),
        ("Reshape", [x, shape], f"{base}_blocked", {}),
        ("ReduceSum", [f"{base}_blocked", f"{base}_last_axis"], sums, {"keepdims": 0}),
        ("MatMul", [sums, offsets], f"{base}_offset_term", {}),
        ("Add", [node.output[0], f"{base}_offset_term"], y, {})]
    return [helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs)
            for op, inputs, output, attrs in steps]
