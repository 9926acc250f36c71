"""`--precision native`: the GGUF's Q4_0 / Q4_1 / Q8_0 blocks kept as they are, run by ORT's own kernels.

Matrices become MatMulNBits with the weights exactly as stored and float32 arithmetic (accuracy level 0).
8-bit MatMulNBits has no fast float32 kernel (a 6144 x 576 part of SmolLM2's Q8_0 head: 12-15 ms at level 0
against 0.12 ms with int8 activations, level 4), and int8 activations broke SmolLM2's answers (its chat
answer to "What is the capital of France?" became French babble): so by default a Q8_0 *matrix* is
dequantized to float32 (exact), and `accuracy_level=4` keeps it 8-bit with int8 activations. A Q8_0 or
Q4_0 embedding table becomes GatherBlockQuantized, and a tied head's parts are MatMulNBits over the very
same bytes (stored once). Q4_1's block minimums are not integer zero points: MatMulNBits runs with zero
points of 0 and a small MatMul adds blocksum(x) @ mins^T, which keeps the kernel on its fast path
(shared/FACTS.md). Any other tensor type is dequantized to float32.
"""
from __future__ import annotations

import numpy as np

from .float_weights import Float32Weights, split_outputs
from .gguf_blocks import BLOCK, BYTES, Blocks, repack, stack
from .gguf_model import GGUFModel
from .onnx_builder import GraphBuilder

TABLE_TYPES = ("Q8_0", "Q4_0")  # GatherBlockQuantized reads these without a correction term


class NativeWeights(Float32Weights):
    def __init__(self, model: GGUFModel, accuracy_level: int = 0):
        super().__init__(model)
        self.accuracy_level = accuracy_level
        self.repacked: dict[str, Blocks] = {}  # per converter, not a process-wide cache holding it
        self.int8_activations = False  # set once a matrix runs at level 4: the self-check tolerance depends on it

    def level(self, bits: int) -> int:
        level = self.accuracy_level
        self.int8_activations |= level == 4
        return level

    def kept(self, name: str) -> bool:
        """Run as MatMulNBits: a quantized matrix, unless 8-bit with float32 arithmetic asked for."""
        kind = self.model.tensor_type(name)
        return kind in BYTES and (kind != "Q8_0" or self.accuracy_level == 4)

    def blocks(self, name: str) -> Blocks:
        """A table or head's blocks, repacked once (the embeddings and every head part read them)."""
        if name not in self.repacked:
            self.repacked[name] = repack(self.model.tensor_type(name), self.model.raw(name))
        return self.repacked[name]

    def linear(self, g: GraphBuilder, x: str, name: str) -> str:
        if not self.kept(name):
            return super().linear(g, x, name)
        return self.matmul_nbits(g, x, repack(self.model.tensor_type(name), self.model.raw(name)))

    def linears(self, g: GraphBuilder, x: str, names: list[str], split: bool = True) -> list[str] | str:
        kinds = {self.model.tensor_type(n) for n in names}
        if len(kinds) > 1 or not all(self.kept(n) for n in names):
            return super().linears(g, x, names, split)
        kind = kinds.pop()
        parts = [repack(kind, self.model.raw(n)) for n in names]
        fused = self.matmul_nbits(g, x, stack(parts))
        return split_outputs(g, fused, [p.codes.shape[0] for p in parts]) if split else fused

    def matmul_nbits(self, g: GraphBuilder, x: str, b: Blocks, rows: slice = slice(None)) -> str:
        codes, scales = b.codes[rows], b.scales[rows]
        n, k = codes.shape[0], codes.shape[1] * BLOCK
        inputs = [x, g.const(codes, "codes"), g.const(scales, "scales")]
        if b.mins is not None:  # explicit zero points of 0, packed two per byte
            inputs.append(g.const(np.zeros((n, (codes.shape[1] + 1) // 2), np.uint8), "zero_points"))
        y = g.op("MatMulNBits", *inputs, domain="com.microsoft", K=k, N=n, bits=b.bits, block_size=BLOCK,
                 accuracy_level=self.level(b.bits))
        if b.mins is None:
            return y
        sums = g.op("ReduceSum", g.op("Reshape", x, g.ints(0, 0, k // BLOCK, BLOCK)), g.ints(-1), keepdims=0)
        return g.op("Add", y, g.op("MatMul", sums, g.const(np.ascontiguousarray(b.mins[rows].T), "mins")))

    def lookup(self, g: GraphBuilder, ids: str) -> str:
        name = "token_embd.weight"
        if self.model.tensor_type(name) not in TABLE_TYPES:
            return super().lookup(g, ids)
        b = self.blocks(name)
        codes = b.codes.reshape(b.codes.shape[0], -1)  # [V, E/(8/bits)]: the head's bytes, as a 2-D table
        return g.op("GatherBlockQuantized", g.const(codes, "table"), ids, g.const(b.scales, "scales"),
                    domain="com.microsoft", bits=b.bits, block_size=BLOCK, gather_axis=0, quantize_axis=1)

    def head_rows(self, g: GraphBuilder, x2d: str, start: int, stop: int) -> str:
        if not self.kept(self.head_name):
            return super().head_rows(g, x2d, start, stop)
        return self.matmul_nbits(g, x2d, self.blocks(self.head_name), slice(start, stop))

    def shared_rows(self) -> list[np.ndarray]:
        if not self.model.settings.tied_head or self.model.tensor_type("token_embd.weight") not in TABLE_TYPES:
            return super().shared_rows()
        if not self.kept(self.head_name):
            return []  # a quantized table, a float32 head: nothing in common to store once
        b = self.blocks("token_embd.weight")
        return [b.codes.reshape(b.codes.shape[0], -1), b.scales]

    def row_bytes(self) -> int:
        if not self.kept(self.head_name):
            return super().row_bytes()
        b = self.blocks(self.head_name)
        return b.codes[0].nbytes + b.scales[0].nbytes
