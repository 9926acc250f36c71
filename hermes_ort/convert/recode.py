"""Rewrite the MatMulNBits nodes ORT's quantizer made with the codes of `block_codes` (why: see there).

ORT's quantizer still decides which MatMuls become MatMulNBits and lays the nodes out; this pass
replaces each node's codes and scales, for `minmax` adds the offsets' term, y = MatMulNBits(x) +
ReduceSum(blocks of x) @ offsets (a few small nodes beside the kernel), and at accuracy level 0 splits an
8-bit node into two 4-bit ones.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .block_codes import BlockCodes, minmax_codes, nibbles, symmetric_codes

SCHEMES = ("minmax", "symmetric")


def matmul_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The constant [K, N] right-hand side of each MatMul, by initializer name (taken before quantizing)."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def accuracy_level(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)


def recode(model: onnx.ModelProto, weights: dict[str, np.ndarray], bits: int, block: int, scheme: str) -> None:
    """In place. A weight whose K is not a multiple of the block (ORT padded it) keeps ORT's codes; `minmax`
    and the 8-bit halves need opset 13 (ReduceSum's axes as an input): below it, `symmetric` in one node.
    8-bit matrices at accuracy level 0 run as two 4-bit halves (block_codes.nibbles)."""
    graph = model.graph
    modern = opset_of(model) >= 13
    nodes = []
    for node in graph.node:
        nodes.append(node)
        weight = weights.get(node.input[1].removesuffix(f"_Q{bits}")) if node.op_type == "MatMulNBits" else None
        if weight is None or weight.shape[0] % block:
            continue
        codes = (minmax_codes if scheme == "minmax" and modern else symmetric_codes)(weight, bits, block)
        replace_initializer(model, node.input[2], codes.scales)
        if bits == 8 and accuracy_level(node) == 0 and modern and len(node.input) == 3:
            nodes[-1:] = as_halves(model, node, codes, block)
        else:
            replace_initializer(model, node.input[1], codes.codes)
            if codes.offsets is not None:
                y, base = node.output[0], node.input[1]
                node.output[0] = f"{y}_codes"
                replace_initializer(model, f"{base}_offsets", np.ascontiguousarray(codes.offsets.T))
                nodes += plus_block_term(model, node.input[0], node.output[0], y, base, codes, block,
                                         f"{base}_offsets")
    del graph.node[:]
    graph.node.extend(nodes)


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray | None) -> None:
    """Set (or with None, remove) the initializer called `name`, touching no other (they hold the weights)."""
    inits = model.graph.initializer
    at = next((i for i, t in enumerate(inits) if t.name == name), None)
    if array is None:
        if at is not None:
            del inits[at]
    elif at is None:
        inits.append(numpy_helper.from_array(array, name))
    else:
        inits[at].CopyFrom(numpy_helper.from_array(array, name))


def as_halves(model: onnx.ModelProto, node: onnx.NodeProto, codes: BlockCodes, block: int) -> list:
    """An 8-bit MatMulNBits -> 16 * MatMulNBits(high) + MatMulNBits(low) + blocksum(x) @ terms. Read with the
    4-bit implied zero point the halves give scale * (code - 136), so the terms add 8 * scale back (plus
    minmax's offsets). A symmetric head's terms come from its scales, so a tied table's bytes stay shared."""
    x, y, base, scales = node.input[0], node.output[0], node.input[1], node.input[2]
    high, low = nibbles(codes)
    replace_initializer(model, base, None)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.update(bits=4, accuracy_level=0)
    out = []
    for half, array in (("high", high), ("low", low)):
        replace_initializer(model, f"{base}_{half}", array)
        out.append(helper.make_node("MatMulNBits", [x, f"{base}_{half}", scales], [f"{y}_{half}"],
                                    name=f"{node.name or base}_{half}", domain="com.microsoft", **attrs))
    replace_initializer(model, f"{base}_sixteen", np.array(16, np.float32))
    out += [helper.make_node("Mul", [f"{y}_high", f"{base}_sixteen"], [f"{y}_high16"], name=f"{y}_high16_Mul"),
            helper.make_node("Add", [f"{y}_high16", f"{y}_low"], [f"{y}_codes"], name=f"{y}_codes_Add")]
    terms = f"{base}_terms"
    if codes.offsets is not None:
        replace_initializer(model, terms, np.ascontiguousarray((codes.offsets + 8 * codes.scales).T))
    else:
        replace_initializer(model, f"{base}_eight", np.array(8, np.float32))
        out += [helper.make_node("Transpose", [scales], [f"{base}_scales_t"], name=f"{base}_scales_t_Transpose"),
                helper.make_node("Mul", [f"{base}_scales_t", f"{base}_eight"], [terms], name=f"{terms}_Mul")]
    return out + plus_block_term(model, x, f"{y}_codes", y, base, codes, block, terms)


def plus_block_term(model: onnx.ModelProto, x: str, codes_out: str, y: str, base: str, codes: BlockCodes,
                    block: int, terms: str) -> list:
    """Nodes for y = codes_out + ReduceSum(x in blocks along K) @ terms, terms [K/block, N]."""
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([codes.scales.shape[1], block], np.int64), f"{base}_block_shape"),
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
        ("MatMul", [sums, terms], f"{base}_block_term", {}),
        ("Add", [codes_out, f"{base}_block_term"], y, {})]
    return [helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs)
            for op, inputs, output, attrs in steps]
