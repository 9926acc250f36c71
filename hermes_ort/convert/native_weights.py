"""`--precision native`: the GGUF's quantized blocks kept as they are (gguf_blocks.py reads every type into
codes, scales, a zero and minimums), run by ORT's own kernels:

- float32 arithmetic (accuracy level 0): only 4-bit MatMulNBits has a fast float32 kernel in ORT 1.32 (a
  6144 x 576 8-bit matrix: 12-15 ms against 0.12 ms at level 4). Codes of up to 4 bits run as they are, at
  the implied zero point 8 or with explicit zero points. Wider codes (Q5_*, Q6_K, Q8_0, IQ4_*) run as a
  "4+4 split": code = low + 16 * high, the low nibbles and the high nibbles two runs of 4-bit blocks along a
  doubled K (scales d and 16 d, zero points 0 and 8) fed Concat(x, x): one node, and every weight
  d * (code - 128) exactly.
- int8 activations (level 4, what llama.cpp computes with): codes of up to 4 bits at 4-bit, wider codes as
  one 8-bit node. No zero-point input at this level: onnxruntime issue 29853 (AVX2 without AVX-512, one row,
  CompInt8 with zero points: wrong results), so a zero that is not the implied one is folded into the block
  offsets below.
- Minimums (Q4_1, Q4_K, Q5_1, Q5_K, Q2_K) are not integer zero points: they are added back as
  blocksums(x) @ offsets^T by a small MatMul, which keeps the kernel on its fast path (shared/FACTS.md). At
  level 4 the block sums are those of the int8 activations, as llama.cpp's Q4_1 x Q8_1 (q4_1_int8 below).

The token table becomes GatherBlockQuantized over the same bytes as a tied head's parts (stored once).
Any other quantized type (IQ1-IQ3, TQ*, MXFP4) has no exact form here and is dequantized to float32, with
one line saying so (`notes`).
"""
from __future__ import annotations

import numpy as np

from .block_codes import pack
from .float_weights import Float32Weights, split_outputs
from .gguf_blocks import TYPES, Blocks, repack, stack
from .gguf_model import GGUFModel
from .onnx_builder import GraphBuilder

FLOAT_TYPES = ("F32", "F16", "BF16")
TABLE = "token_embd.weight"


def implied_zero(bits: int) -> int:
    return 1 << (bits - 1)


class NativeWeights(Float32Weights):
    def __init__(self, model: GGUFModel, accuracy_level: int = 0):
        super().__init__(model)
        self.accuracy_level = accuracy_level
        self.repacked: dict[str, Blocks] = {}  # the table and head, read once (every head part slices them)
        self.halved: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.int8_activations = False  # set once a matrix runs at level 4: the self-check tolerance depends on it
        self.forms: dict[str, str] = {}  # tensor -> the form it took (the manifest says it)
        self.dequantized_types: set[str] = set()

    @property
    def notes(self) -> list[str]:
        return [f"{kind} has no exact form on ORT's kernels: its tensors are dequantized to float32"
                for kind in sorted(self.dequantized_types)]

    def level(self) -> int:
        self.int8_activations |= self.accuracy_level == 4
        return self.accuracy_level

    def kept(self, name: str) -> bool:
        kind = self.model.tensor_type(name)
        if kind not in TYPES and kind not in FLOAT_TYPES:
            self.dequantized_types.add(kind)
            self.forms[name] = f"{kind} -> float32 (no exact form)"
        return kind in TYPES

    def split_form(self, b: Blocks) -> bool:
        """8-bit codes at float32 arithmetic: the 4+4 split (module docstring)."""
        return b.bits == 8 and self.accuracy_level != 4

    def describe(self, name: str, b: Blocks, table: bool = False) -> None:
        halves_of_table = b.bits == 8 and self.tied_split() and (table or name == TABLE)
        if halves_of_table:
            shape = "two 4-bit halves at one scale (the tied table's bytes)"
        elif self.split_form(b) and not table:
            shape = "4+4-bit split over a doubled K"
        else:
            shape = f"{b.bits}-bit"
        op = "GatherBlockQuantized" if table else "MatMulNBits"
        extra = "" if b.mins is None else ", minimums added" if table else ", minimums by block sums"
        self.forms[name + (" (lookup)" if table else "")] = (
            f"{self.model.tensor_type(name)} -> {op} {shape}, block {b.block}{extra}")

    def blocks(self, name: str) -> Blocks:
        """A table or head's blocks, read once (the embeddings and every head part read them)."""
        if name not in self.repacked:
            self.repacked[name] = self.read(name)
        return self.repacked[name]

    def read(self, name: str) -> Blocks:
        return repack(self.model.tensor_type(name), self.model.raw(name))

    def linear(self, g: GraphBuilder, x: str, name: str) -> str:
        if not self.kept(name):
            return super().linear(g, x, name)
        b = self.read(name)
        self.describe(name, b)
        return self.matmul(g, x, b)

    def linears(self, g: GraphBuilder, x: str, names: list[str], split: bool = True) -> list[str] | str:
        kinds = {self.model.tensor_type(n) for n in names}
        if len(kinds) == 1 and all(self.kept(n) for n in names):  # one node for all (stack the rows)
            parts = [self.read(n) for n in names]
            for n, p in zip(names, parts):
                self.describe(n, p)
            fused = self.matmul(g, x, stack(parts))
            return split_outputs(g, fused, [p.rows for p in parts]) if split else fused
        if not any(self.model.tensor_type(n) in TYPES for n in names):
            return super().linears(g, x, names, split)
        outputs = [self.linear(g, x, n) for n in names]  # types differ (Q4_K_M: a Q6_K attn_v beside Q4_K)
        return outputs if split else g.op("Concat", *outputs, axis=-1)

    def matmul(self, g: GraphBuilder, x: str, b: Blocks, appended_sums: bool = True, rank: int = 3) -> str:
        """x [.., K] (of `rank` axes) @ the blocks' weights^T. appended_sums: the int8 block sums may come
        from rows added to b's own codes (not when those codes are a tied table's bytes)."""
        level = self.level()
        if self.split_form(b):
            codes, scales, zeros = split_arrays(b)
            y = nbits(g, g.op("Concat", x, x, axis=-1), codes, scales, 4, b.block, level, zeros)
            return self.add_offsets(g, x, b, b.mins, y, level, rank)
        zero, offsets = b.zero, b.mins
        if zero != implied_zero(b.bits) and level == 4:  # read at the implied zero, the difference as offsets
            offsets = (0 if offsets is None else offsets) + (implied_zero(b.bits) - zero) * b.scales
            zero = implied_zero(b.bits)
        codes = pack(b.codes, b.bits)
        if offsets is not None and level == 4 and appended_sums:  # one node gives y and the int8 block sums
            return self.with_int8_sums(g, x, b, codes, offsets)
        zeros = None if zero == implied_zero(b.bits) else zero_points(b.rows, b.codes.shape[1], zero)
        y = nbits(g, x, codes, b.scales, b.bits, b.block, level, zeros)
        return self.add_offsets(g, x, b, offsets, y, level, rank)

    def add_offsets(self, g: GraphBuilder, x: str, b: Blocks, offsets, y: str, level: int, rank: int) -> str:
        if offsets is None:
            return y
        if level == 4:  # the int8 activations' block sums, from a node of ones at the same blocks
            blocks = b.codes.shape[1]
            sums = nbits(g, x, ones_codes(blocks, b.block, b.bits), np.ones((blocks, blocks), np.float32),
                         b.bits, b.block, level)
        else:
            by_block = g.ints(*[0] * (rank - 1), b.k // b.block, b.block)
            sums = g.op("ReduceSum", g.op("Reshape", x, by_block), g.ints(-1), keepdims=0)
        return g.op("Add", y, g.op("MatMul", sums, g.const(np.ascontiguousarray(offsets.T), "offsets")))

    def with_int8_sums(self, g: GraphBuilder, x: str, b: Blocks, codes: np.ndarray, offsets: np.ndarray) -> str:
        """Minimums at int8 activations as llama.cpp computes them (Q4_1 x Q8_1): each weight meets the
        quantized activation x_q, so the minimums multiply the block sums of x_q, not of x. The kernel makes
        those sums itself, from one more output row per block of K whose weights are 1 on that block (code
        implied zero + 1, scale 1). Why: with sums of the float x, SmolLM2's mean KL against float32 was 5.5x
        llama.cpp's (1.6e-2); with these, the same as llama.cpp's (`python -m bench.accuracy FILE.gguf`)."""
        n, blocks = b.rows, b.codes.shape[1]
        both = nbits(g, x, np.concatenate([codes, ones_codes(blocks, b.block, b.bits)]),
                     np.concatenate([b.scales, np.ones((blocks, blocks), np.float32)]), b.bits, b.block, 4)
        y, sums = g.op("Split", both, g.ints(n, blocks), axis=-1, outputs=2)  # [.., N], [.., K/block]
        return g.op("Add", y, g.op("MatMul", sums, g.const(np.ascontiguousarray(offsets.T), "offsets")))

    def tied_split(self) -> bool:
        """The tied table and head are 8-bit codes at float32 arithmetic: both read the same two halves."""
        return self.model.settings.tied_head and self.accuracy_level != 4

    def table_halves(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """halves() of the tied table, made once (the embeddings and every head part read them)."""
        if name not in self.halved:
            self.halved[name] = halves(self.blocks(name))
        return self.halved[name]

    def lookup(self, g: GraphBuilder, ids: str) -> str:
        if not self.kept(TABLE):
            return super().lookup(g, ids)
        b = self.blocks(TABLE)
        self.describe(TABLE, b, table=True)
        if b.bits == 8 and self.tied_split():  # 16 * (high - 8) + low: the head's two halves, row by row
            high, low, zeros = self.table_halves(TABLE)
            scales = g.const(b.scales, "scales")
            rows_high = gather_rows(g, g.const(as_table(high), "table"), ids, scales, 4, b.block)
            rows_low = gather_rows(g, g.const(as_table(low), "table"), ids, scales, 4, b.block,
                                   g.const(zeros, "zero_points"))
            rows = g.op("Add", g.op("Mul", rows_high, g.const(np.float32(16), "sixteen")), rows_low)
        else:
            zeros = None if b.zero == implied_zero(b.bits) else g.const(
                zero_points(b.rows, b.codes.shape[1], b.zero, b.bits), "zero_points")
            rows = gather_rows(g, g.const(as_table(pack(b.codes, b.bits)), "table"), ids,
                               g.const(b.scales, "scales"), b.bits, b.block, zeros)
        if b.mins is None:
            return rows
        mins = g.op("Unsqueeze", g.op("Gather", g.const(b.mins, "mins"), ids, axis=0), g.ints(-1))
        by_block = g.op("Reshape", rows, g.ints(0, 0, b.codes.shape[1], b.block))
        return g.op("Reshape", g.op("Add", by_block, mins), g.ints(0, 0, b.k))

    def head_rows(self, g: GraphBuilder, x2d: str, start: int, stop: int) -> str:
        if not self.kept(self.head_name):
            return super().head_rows(g, x2d, start, stop)
        b = self.blocks(self.head_name)
        self.describe(self.head_name, b)
        rows = slice(start, stop)
        if self.split_form(b) and self.tied_split():  # the table's halves: two nodes at one scale each
            high, low, zeros = (a[rows] for a in self.table_halves(self.head_name))
            level, part = self.level(), b.select(rows)
            y_high = nbits(g, x2d, high, part.scales, 4, b.block, level)
            y = g.op("Add", g.op("Mul", y_high, g.const(np.float32(16), "sixteen")),
                     nbits(g, x2d, low, part.scales, 4, b.block, level, zeros))
            return self.add_offsets(g, x2d, part, part.mins, y, level, rank=2)
        return self.matmul(g, x2d, b.select(rows), appended_sums=not self.model.settings.tied_head, rank=2)

    def shared_rows(self) -> list[np.ndarray]:
        if not self.model.settings.tied_head:
            return []
        if not self.kept(TABLE):
            return super().shared_rows()
        b = self.blocks(TABLE)
        if self.split_form(b):
            high, low, _ = self.table_halves(TABLE)  # zero points: 1/32 of a code's bytes
            return [as_table(high), as_table(low), b.scales]
        return [as_table(pack(b.codes, b.bits)), b.scales]

    def row_bytes(self) -> int:
        if not self.kept(self.head_name):
            return super().row_bytes()
        b = self.blocks(self.head_name)
        doubled = self.split_form(b) and not self.tied_split()  # the split's own scales, d and 16 d
        return b.k * b.bits // 8 + b.scales[0].nbytes * (2 if doubled else 1) + (
            0 if b.mins is None else b.mins[0].nbytes)


def halves(b: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit codes (zero 128) -> (high, low) 4-bit codes [N, K/block, block/2] and the low half's zero points
    of 0 [N, ceil(blocks/2)] (the high half keeps the implied 8): 16 * (high - 8) + low = code - 128, at the
    same scales, so a tied table and its head keep one copy of them."""
    assert b.bits == 8 and b.zero == 128
    return pack(b.codes >> 4, 4), pack(b.codes & 0x0F, 4), zero_points(b.rows, b.codes.shape[1], 0)


def split_arrays(b: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit codes (zero 128) as the 4+4 split over a doubled K: codes [N, 2*blocks, block/2] (the low
    nibbles' blocks, then the high nibbles'), scales [N, 2*blocks] (d, then 16 d) and packed zero points
    (0 for low blocks, 8 for high): low + 16 * (high - 8) = code - 128, so each weight is d * (code - 128)."""
    assert b.bits == 8 and b.zero == 128
    n, blocks = b.rows, b.codes.shape[1]
    codes = pack(np.concatenate([b.codes & 0x0F, b.codes >> 4], axis=1), 4)
    scales = np.concatenate([b.scales, 16 * b.scales], axis=1)
    zeros = np.concatenate([np.zeros((n, blocks), np.uint8), np.full((n, blocks), 8, np.uint8)], axis=1)
    return codes, scales, pack_zero_points(zeros)


def pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """[N, blocks] 4-bit zero points -> [N, ceil(blocks/2)] bytes, low nibble first (MatMulNBits' layout)."""
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), np.uint8)], axis=1)
    return (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


def zero_points(n: int, blocks: int, zero: int, bits: int = 4) -> np.ndarray:
    """Every block's zero point `zero`, packed as the kernels read them."""
    full = np.full((n, blocks), zero, np.uint8)
    return full if bits == 8 else pack_zero_points(full)


def ones_codes(blocks: int, block: int, bits: int) -> np.ndarray:
    """One row per block of K whose weights are 1 on that block and 0 elsewhere (at the implied zero)."""
    codes = implied_zero(bits) + np.eye(blocks, dtype=np.uint8)[..., None]
    return pack(np.broadcast_to(codes, (blocks, blocks, block)), bits)


def nbits(g: GraphBuilder, x: str, codes: np.ndarray, scales: np.ndarray, bits: int, block: int, level: int,
          zeros: np.ndarray | None = None) -> str:
    """MatMulNBits over codes [N, K/block, block*bits/8] (zeros: packed zero points, None: the implied)."""
    n, k = codes.shape[0], codes.shape[1] * block
    inputs = [x, g.const(codes, "codes"), g.const(scales, "scales")]
    inputs += [g.const(zeros, "zero_points")] if zeros is not None else []
    return g.op("MatMulNBits", *inputs, domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                accuracy_level=level)


def as_table(codes: np.ndarray) -> np.ndarray:
    """[N, blocks, bytes] -> [N, blocks * bytes]: MatMulNBits' bytes as GatherBlockQuantized's 2-D table."""
    return codes.reshape(codes.shape[0], -1)


def gather_rows(g: GraphBuilder, table: str, ids: str, scales: str, bits: int, block: int,
                zero_points: str | None = None) -> str:
    inputs = [table, ids, scales] + ([zero_points] if zero_points else [])
    return g.op("GatherBlockQuantized", *inputs, domain="com.microsoft", bits=bits, block_size=block,
                gather_axis=0, quantize_axis=1)
