"""`--precision native`: the GGUF's Q4_0 / Q4_1 / Q8_0 blocks kept as they are, run by ORT's own kernels.

Matrices become MatMulNBits with the weights exactly as stored and float32 arithmetic (accuracy level 0).
8-bit MatMulNBits has no fast float32 kernel in ORT 1.32 (a 6144 x 576 part of SmolLM2's Q8_0 head: 12-15 ms
at level 0 against 0.12 ms with int8 activations, level 4), so at level 0 a Q8_0 matrix runs as two 4-bit
halves on the fast kernel: code = 16 * high + low, y = 16 * MatMulNBits(high) + MatMulNBits(low, zero points
0), with high read at its implied zero point 8, which is d * (code - 128) for every weight, exactly (d is
fp16 and |code - 128| < 256: every product and sum is an fp32 number). `accuracy_level=4` keeps it one 8-bit
node with int8 activations. A Q8_0 or Q4_0 embedding table becomes GatherBlockQuantized (Q8_0 at level 0:
over the same two halves), and a tied head's parts are MatMulNBits over the very same bytes (stored once).
Q4_1's block minimums are not integer zero points: MatMulNBits runs with zero points of 0 and a small MatMul
adds blocksum(x) @ mins^T, which keeps the kernel on its fast path (shared/FACTS.md); at level 4 the block
sums are those of the int8 activations, as llama.cpp's Q4_1 x Q8_1 (q4_1_int8). Any other tensor type is
dequantized to float32.
"""
from __future__ import annotations

import numpy as np

from .block_codes import pack
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
        self.halved: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.int8_activations = False  # set once a matrix runs at level 4: the self-check tolerance depends on it

    def level(self, bits: int) -> int:
        level = self.accuracy_level
        self.int8_activations |= level == 4
        return level

    def kept(self, name: str) -> bool:
        """Run as MatMulNBits: every quantized type repack() reads."""
        return self.model.tensor_type(name) in BYTES

    def as_halves(self, b: Blocks) -> bool:
        """8-bit codes at float32 arithmetic: two 4-bit halves (the module docstring says why)."""
        return b.bits == 8 and self.accuracy_level != 4

    def blocks(self, name: str) -> Blocks:
        """A table or head's blocks, repacked once (the embeddings and every head part read them)."""
        if name not in self.repacked:
            self.repacked[name] = repack(self.model.tensor_type(name), self.model.raw(name))
        return self.repacked[name]

    def table_halves(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """halves() of a table or head's 8-bit blocks, made once."""
        if name not in self.halved:
            self.halved[name] = halves(self.blocks(name))
        return self.halved[name]

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

    def matmul_nbits(self, g: GraphBuilder, x: str, b: Blocks, rows: slice = slice(None),
                     halved: tuple[np.ndarray, ...] | None = None) -> str:
        """halved: b's halves() when already made (a tied table's, made once for every head part)."""
        if self.as_halves(b):
            high, low, zeros = (a[rows] for a in halved or halves(b))
            y_high = self.matmul_4bit(g, x, high, b.scales[rows])
            return g.op("Add", g.op("Mul", y_high, g.const(np.float32(16), "sixteen")),
                        self.matmul_4bit(g, x, low, b.scales[rows], zeros))
        codes, scales = b.codes[rows], b.scales[rows]
        if b.mins is not None and self.accuracy_level == 4:
            return self.q4_1_int8(g, x, codes, scales, b.mins[rows])
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

    def q4_1_int8(self, g: GraphBuilder, x: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> str:
        """Q4_1 at int8 activations as llama.cpp computes it (Q4_1 x Q8_1): each weight d * q + m meets the
        quantized activation x_q, so the minimums multiply the block sums of x_q, not of x. The kernel makes
        those sums itself, from one more output row per block of K whose weights are 1 on that block (code 9
        at the implied zero point 8, scale 1): y = x_q @ (d * (q - 8))^T + sums(x_q) @ (m + 8 * d)^T.
        Why: with sums of the float x, SmolLM2's mean KL against float32 was 5.5x llama.cpp's (1.6e-2);
        with these, the same as llama.cpp's (`python -m bench.accuracy FILE.gguf`). No zero-point input, so
        onnxruntime issue 29853 (uint8 zero points, one row, AVX2) does not apply."""
        n, blocks = codes.shape[0], codes.shape[1]
        ones = pack(np.broadcast_to(8 + np.eye(blocks, dtype=np.uint8)[..., None], (blocks, blocks, BLOCK)), 4)
        inputs = [x, g.const(np.concatenate([codes, ones]), "codes"),
                  g.const(np.concatenate([scales, np.ones((blocks, blocks), np.float32)]), "scales")]
        both = g.op("MatMulNBits", *inputs, domain="com.microsoft", K=blocks * BLOCK, N=n + blocks, bits=4,
                    block_size=BLOCK, accuracy_level=self.level(4))
        y, sums = g.op("Split", both, g.ints(n, blocks), axis=-1, outputs=2)  # [.., N], [.., K/32]
        offsets = np.ascontiguousarray((mins + 8 * scales).T)
        return g.op("Add", y, g.op("MatMul", sums, g.const(offsets, "offsets")))

    def matmul_4bit(self, g: GraphBuilder, x: str, codes: np.ndarray, scales: np.ndarray,
                    zero_points: np.ndarray | None = None) -> str:
        """codes [N, K/32, 16] read at zero_points [N, ceil(K/64)] (None: the implied 8)."""
        n, k = codes.shape[0], codes.shape[1] * BLOCK
        inputs = [x, g.const(codes, "codes"), g.const(scales, "scales")]
        inputs += [g.const(zero_points, "zero_points")] if zero_points is not None else []
        return g.op("MatMulNBits", *inputs, domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK,
                    accuracy_level=self.level(4))

    def lookup(self, g: GraphBuilder, ids: str) -> str:
        name = "token_embd.weight"
        if self.model.tensor_type(name) not in TABLE_TYPES:
            return super().lookup(g, ids)
        b = self.blocks(name)
        if self.as_halves(b):  # 16 * (high - 8) + low: the head's two halves, looked up row by row
            high, low, zeros = (as_table(a) for a in self.table_halves(name))
            scales = g.const(b.scales, "scales")
            rows_high = gather_rows(g, g.const(high, "table"), ids, scales, 4)
            rows_low = gather_rows(g, g.const(low, "table"), ids, scales, 4, g.const(zeros, "zero_points"))
            return g.op("Add", g.op("Mul", rows_high, g.const(np.float32(16), "sixteen")), rows_low)
        return gather_rows(g, g.const(as_table(b.codes), "table"), ids, g.const(b.scales, "scales"), b.bits)

    def head_rows(self, g: GraphBuilder, x2d: str, start: int, stop: int) -> str:
        if not self.kept(self.head_name):
            return super().head_rows(g, x2d, start, stop)
        b = self.blocks(self.head_name)
        halved = self.table_halves(self.head_name) if self.as_halves(b) else None
        return self.matmul_nbits(g, x2d, b, slice(start, stop), halved)

    def shared_rows(self) -> list[np.ndarray]:
        if not self.model.settings.tied_head or self.model.tensor_type("token_embd.weight") not in TABLE_TYPES:
            return super().shared_rows()
        if not self.kept(self.head_name):
            return []  # a quantized table, a float32 head: nothing in common to store once
        b = self.blocks("token_embd.weight")
        if self.as_halves(b):
            high, low, _ = self.table_halves("token_embd.weight")  # zero points: 1/32 of a code's bytes
            return [as_table(high), as_table(low), b.scales]
        return [as_table(b.codes), b.scales]

    def row_bytes(self) -> int:
        if not self.kept(self.head_name):
            return super().row_bytes()
        b = self.blocks(self.head_name)
        codes = self.table_halves(self.head_name) if self.as_halves(b) else (b.codes,)
        return sum(a[0].nbytes for a in codes) + b.scales[0].nbytes


def halves(b: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit codes [N, K/32, 32] -> (high, low) 4-bit codes [N, K/32, 16] and the low half's zero points of 0
    [N, ceil(K/64)] (the high half keeps the implied 8, so 16 * (high - 8) + low = code - 128)."""
    high, low = pack(b.codes >> 4, 4), pack(b.codes & 0x0F, 4)
    return high, low, np.zeros((b.codes.shape[0], (b.codes.shape[1] + 1) // 2), np.uint8)


def as_table(codes: np.ndarray) -> np.ndarray:
    """[N, blocks, bytes] -> [N, blocks * bytes]: MatMulNBits' bytes as GatherBlockQuantized's 2-D table."""
    return codes.reshape(codes.shape[0], -1)


def gather_rows(g: GraphBuilder, table: str, ids: str, scales: str, bits: int, zero_points: str | None = None) -> str:
    inputs = [table, ids, scales] + ([zero_points] if zero_points else [])
    return g.op("GatherBlockQuantized", *inputs, domain="com.microsoft", bits=bits, block_size=BLOCK,
                gather_axis=0, quantize_axis=1)
