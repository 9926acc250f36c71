"""The codes `hermes quantize` writes into ORT's MatMulNBits: chosen so that weights already on a block grid
come back exactly.

ORT's quantizer rounds each block to scale = (signed max) / -2^(bits-1). Weights converted from a GGUF sit on
the file's own grid (Q4_1: minimum + d * k, k = 0..15; Q8_0: d * k, |k| <= 127), and that rounding moves
them: SmolLM2's fp32 conversion re-quantized that way agreed with fp32 on the next token at 97.5% of real
text. Two code families fix it, both read by ORT's own kernels:

- `minmax` (matrices of blocks): code = round((w - min) / scale), scale = (max - min) / (2^bits - 1), and
  the block minimums added back by a small MatMul over the block sums of the input (as the native Q4_1 path
  does). The kernel keeps its implied zero point (2^(bits-1)), folded into that term, so its node is the
  one ORT's quantizer writes (no zero-point input). It uses every code on each block's own range, so it is
  never coarser than symmetric rounding, and it gives a Q4_1 block back exactly at 4 and 8 bits.
- `symmetric` (heads, whose bytes double as a GatherBlockQuantized table, which has no float minimum):
  scale = max |w| / (2^(bits-1) - 1), the implied zero point of MatMulNBits; a Q8_0 row comes back exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockCodes:
    """MatMulNBits' inputs for one [K, N] weight: codes [N, K/block, block*bits/8] and scales [N, K/block],
    read with the implied zero point; for minmax also the per-block term added back, offsets [N, K/block]
    (w = scale * (code - 2^(bits-1)) + offset, the offset being minimum + 2^(bits-1) * scale)."""

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int

    def dequantized(self) -> np.ndarray:
        """[K, N] float32: what the kernel computes with (for tests and drift checks)."""
        w = (unpack(self.codes, self.bits).astype(np.float64) - (1 << (self.bits - 1))) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(w.shape[0], -1).T.astype(np.float32)


def blocks_of(weight: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [N, K/block, block] in float64 (K must be a multiple of block)."""
    k, n = weight.shape
    return weight.T.astype(np.float64).reshape(n, k // block, block)


def minmax_codes(weight: np.ndarray, bits: int, block: int) -> BlockCodes:
    w = blocks_of(weight, block)
    lo, hi = w.min(-1), w.max(-1)
    scales = (hi - lo) / ((1 << bits) - 1)
    scales[scales == 0] = 1.0  # a constant block: every code 0, the minimum carries it
    codes = np.clip(np.rint((w - lo[..., None]) / scales[..., None]), 0, (1 << bits) - 1)
    scales = scales.astype(np.float32)
    offsets = lo + (1 << (bits - 1)) * scales.astype(np.float64)
    return BlockCodes(pack(codes, bits), scales, offsets.astype(np.float32), bits)


def symmetric_codes(weight: np.ndarray, bits: int, block: int) -> BlockCodes:
    w = blocks_of(weight, block)
    top = (1 << (bits - 1)) - 1
    scales = np.abs(w).max(-1) / top
    scales[scales == 0] = 1.0
    scales = scales.astype(np.float32).astype(np.float64)  # round with the scale the kernel will use
    codes = np.clip(np.rint(w / scales[..., None]), -top, top) + (1 << (bits - 1))
    return BlockCodes(pack(codes, bits), scales.astype(np.float32), None, bits)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, blocks, block] codes -> MatMulNBits bytes: 8-bit as they are, 4-bit two per byte, low nibble first."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def nibbles(codes: BlockCodes) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit code's high and low halves, each packed as 4-bit codes (code = 16 * high + low): ORT 1.32
    has no fast float32 kernel for 8-bit MatMulNBits on x86 (128 ms for a 2048 x 5632 matrix at one token,
    against 2.8-4.6 ms for each 4-bit half), so at accuracy level 0 an 8-bit matrix runs as two 4-bit ones."""
    assert codes.bits == 8
    return pack(codes.codes >> 4, 4), pack(codes.codes & 0x0F, 4)
