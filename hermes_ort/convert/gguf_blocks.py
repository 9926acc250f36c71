"""GGUF quantized blocks repacked, bit for bit, into the layout of ORT's MatMulNBits / GatherBlockQuantized.

Every type here quantizes rows in blocks of 32 values along `in` (K). GGUF blocks (ggml-common.h):
  Q8_0: fp16 d, 32 x int8 q                 value = d * q
  Q4_0: fp16 d, 16 bytes: q[j] low nibble, q[j+16] high   value = d * (q - 8)
  Q4_1: fp16 d, fp16 m, 16 bytes as Q4_0                  value = d * q + m
ORT packs 4-bit values in order (value 2i in the low nibble of byte i); with no zero points it subtracts
2^(bits-1), which is Q4_0's 8 and (for q + 128 stored as uint8) Q8_0's 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


@dataclass(frozen=True)
class Blocks:
    """A matrix [N, K] as ORT reads it: codes [N, K/32, 32*bits/8], scales [N, K/32], and for Q4_1 the block
    minimums [N, K/32] that ORT cannot take as integer zero points (added back as blocksum(x) @ mins^T)."""

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        """float32 [N, K], for tests and references."""
        if self.bits == 8:
            q = self.codes.astype(np.float32) - 128
        else:
            q = np.stack([self.codes & 0x0F, self.codes >> 4], axis=-1).reshape(*self.codes.shape[:2], BLOCK)
            q = q.astype(np.float32) - (0 if self.mins is not None else 8)
        values = q * self.scales[..., None] + (0 if self.mins is None else self.mins[..., None])
        return values.reshape(self.codes.shape[0], -1)


def repack(kind: str, raw: np.ndarray) -> Blocks:
    """raw: the GGUF bytes of a matrix, uint8 [N, K/32 * BYTES[kind]]."""
    blocks = raw.reshape(raw.shape[0], -1, BYTES[kind])
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        return Blocks(8, (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), scales)
    start = 2 if kind == "Q4_0" else 4
    qs = blocks[..., start:start + 16]
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32] in element order
    codes = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else None
    return Blocks(4, codes, scales, mins)


def stack(parts: list[Blocks]) -> Blocks:
    """Matrices of one type with the same K, their rows one after another: one MatMulNBits for several."""
    mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
    return Blocks(parts[0].bits, np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                  mins)
