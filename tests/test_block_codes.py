"""The codes hermes quantize writes into MatMulNBits: exact on GGUF grids, never coarser than symmetric
rounding, and what ORT's kernel computes with."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hermes_ort.convert.block_codes import minmax_codes, nibbles, symmetric_codes
from hermes_ort.convert.quantize import QuantizeSettings, quantized

pytest.importorskip("onnx_ir", reason="onnxruntime's matmul_nbits_quantizer needs onnx-ir")

K, N, BLOCK = 96, 40, 32


def q4_1_grid(rng) -> np.ndarray:
    """[K, N] float32 weights as a Q4_1 GGUF holds them: per block of 32 along K, minimum + d * k, k = 0..15."""
    d = rng.uniform(0.001, 0.02, (N, K // BLOCK, 1)).astype(np.float32)
    m = -rng.uniform(0, 16, (N, K // BLOCK, 1)).astype(np.float32) * d
    k = rng.integers(0, 16, (N, K // BLOCK, BLOCK))
    k[..., 0], k[..., 1] = 0, 15  # llama.cpp's rounding puts the block's minimum and maximum on the ends
    return (m + d * k).reshape(N, K).T.copy()


def q8_0_grid(rng) -> np.ndarray:
    d = rng.uniform(0.001, 0.02, (N, K // BLOCK, 1)).astype(np.float32)
    k = rng.integers(-127, 128, (N, K // BLOCK, BLOCK))
    k[..., 0] = 127
    return (d * k).reshape(N, K).T.copy()


@pytest.mark.parametrize("bits", [8, 4])
def test_minmax_gives_a_q4_1_grid_back(bits):
    w = q4_1_grid(np.random.default_rng(bits))
    np.testing.assert_allclose(minmax_codes(w, bits, BLOCK).dequantized(), w, rtol=1e-6, atol=1e-7)


def test_symmetric_gives_a_q8_0_grid_back():
    w = q8_0_grid(np.random.default_rng(0))
    np.testing.assert_allclose(symmetric_codes(w, 8, BLOCK).dequantized(), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_minmax_is_within_half_a_step_and_finer_than_symmetric(bits):
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    blocks = w.T.reshape(N, K // BLOCK, BLOCK)
    step = (blocks.max(-1) - blocks.min(-1)) / ((1 << bits) - 1)
    error = np.abs(minmax_codes(w, bits, BLOCK).dequantized() - w).T.reshape(N, K // BLOCK, BLOCK).max(-1)
    assert np.all(error <= step / 2 * (1 + 1e-5))
    symmetric = np.abs(symmetric_codes(w, bits, BLOCK).dequantized() - w)
    assert np.mean((minmax_codes(w, bits, BLOCK).dequantized() - w) ** 2) < np.mean(symmetric ** 2)


def one_matmul(w: np.ndarray, opset: int, rank: int) -> onnx.ModelProto:
    shape = ["batch", "sequence", K][-rank:]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[:-1] + [N])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("bits, scheme, opset, rank, level", [
    (8, "minmax", 17, 3, 0), (4, "minmax", 17, 2, 0), (4, "minmax", 13, 3, 0), (8, "symmetric", 17, 3, 0),
    (8, "symmetric", 13, 2, 0), (8, "minmax", 17, 3, 4)])
def test_ort_computes_with_the_codes_written(bits, scheme, opset, rank, level):
    """The rewritten graph (MatMulNBits, the minimums' term, 8-bit as two 4-bit halves at level 0) equals
    x @ the dequantized codes, for either rank of input and below opset 15 (Shape without `end`)."""
    rng = np.random.default_rng(bits + opset)
    w = rng.standard_normal((K, N)).astype(np.float32) + 0.5  # skewed blocks: the minimums matter
    model = quantized(one_matmul(w, opset, rank), bits, QuantizeSettings(bits=bits, accuracy_level=level), scheme)
    kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    widths = [next(a.i for a in n.attribute if a.name == "bits") for n in kernels]
    assert widths == ([4, 4] if bits == 8 and level == 0 else [bits])
    x = rng.standard_normal((2, 3, K)[-rank:]).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    codes = (minmax_codes if scheme == "minmax" else symmetric_codes)(w, bits, BLOCK)
    if level == 0:
        np.testing.assert_allclose(got, x @ codes.dequantized(), rtol=1e-4, atol=1e-4)
    else:  # int8 activations: near, not equal
        np.testing.assert_allclose(got, x @ codes.dequantized(), rtol=0, atol=0.05 * np.abs(x @ w).max())


def test_halves_of_q4_1_codes_are_equal():
    """An 8-bit minmax code of a Q4_1 grid is 17 * k: its high and low halves are equal (so the weight
    writer, which stores equal tensors once, halves an 8-bit stage converted from a Q4_1 GGUF)."""
    codes = minmax_codes(q4_1_grid(np.random.default_rng(5)), 8, BLOCK)
    high, low = nibbles(codes)
    assert np.array_equal(high, low)
    assert not np.array_equal(*nibbles(minmax_codes(np.random.default_rng(6).standard_normal((K, N)), 8, BLOCK)))
