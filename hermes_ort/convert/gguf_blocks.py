"""GGUF quantized blocks read, bit for bit, as integer codes on blocks along K: w = scale * (code - zero) + min.

Each type's block layout is ggml's (ggml-common.h); what comes out is the same for all of them, so one
emitter (native_weights.py) runs every type on ORT's kernels. The codes are those the file stores, moved by
a constant so that they sit at a kernel's implied zero point where they can:

  type    values                         block  codes here                    zero  minimum
  Q4_0    d * (q - 8)                      32   q (4-bit)                       8    -
  Q4_1    d * q + m                        32   q (4-bit)                       0    m
  Q4_K    d*sc * q - dmin*m                32   q (4-bit)                       0    -dmin*m
  Q3_K    d*(sc-32) * q, q in [-4, 3]      16   q + 8 (4-bit)                   8    -
  Q2_K    d*sc * q - dmin*m, q in [0, 3]   16   q + 8 (4-bit)                   8    -dmin*m
  Q5_0    d * (q - 16)                     32   q - 16 + 128 (8-bit)          128    -
  Q5_1    d * q + m                        32   q + 128 (8-bit)               128    m
  Q5_K    d*sc * q - dmin*m                32   q + 128 (8-bit)               128    -dmin*m
  Q6_K    d*sc * (q - 32), sc int8         16   q - 32 + 128 (8-bit)          128    -
  Q8_0    d * q, q int8                    32   q + 128 (8-bit)               128    -
  IQ4_NL  d * kvalues[q]                   32   kvalues[q] + 128 (8-bit)      128    -
  IQ4_XS  d*(ls-32) * kvalues[q]           32   kvalues[q] + 128 (8-bit)      128    -

Every scale is an fp16 times a small integer, so it is an exact float32, and scale * (code - zero) is exact:
the weights here, composed in float64 and rounded once, are gguf-py's float32 dequantization bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPER = 256  # values per K-quant super-block
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)


@dataclass(frozen=True)
class Blocks:
    """A matrix [N, K] as codes [N, K/block, block] (one uint8 each), scales [N, K/block] float32, the code
    that means 0 (8 or 128, the kernels' implied zero points, or 0 under minimums) and minimums [N, K/block]."""

    bits: int  # 4 or 8: the narrowest kernel width that holds the codes
    block: int
    codes: np.ndarray
    scales: np.ndarray
    zero: int
    mins: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1] * self.block

    def dequantized(self) -> np.ndarray:
        """float32 [N, K]: each weight rounded once from its exact value, as gguf-py's float32 arithmetic gives."""
        w = (self.codes.astype(np.float64) - self.zero) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.astype(np.float32).reshape(self.rows, -1)

    def select(self, rows: slice) -> "Blocks":
        mins = None if self.mins is None else self.mins[rows]
        return Blocks(self.bits, self.block, self.codes[rows], self.scales[rows], self.zero, mins)


def half(raw: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, as float32 [n]."""
    return raw[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def nibbles_in_order(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] values: low nibbles are values 0-15, high nibbles 16-31 (Q4_0's layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def low_bits(qs: np.ndarray, shifts: tuple[int, ...], mask: int, width: int = 32) -> np.ndarray:
    """[n, chunks*width] bytes -> [n, chunks, len(shifts), width]: bits `shifts` of each byte, chunk by chunk."""
    q = qs.reshape(qs.shape[0], -1, 1, width) >> np.array(shifts, np.uint8).reshape(1, 1, -1, 1)
    return q & np.uint8(mask)


def high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[n, 32] mask bytes -> [n, count, 32]: bit i of byte l belongs to value i*32 + l."""
    return (qh.reshape(qh.shape[0], 1, 32) >> np.arange(count, dtype=np.uint8).reshape(1, -1, 1)) & np.uint8(1)


def k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit minimums (ggml's get_scale_min_k4)."""
    d, m, both = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([d & 0x3F, (both & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (both >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


# Each reader: raw blocks [n, type bytes] -> (codes [n, sub, block] as in the table, scales [n, sub],
# minimums [n, sub] or None). n counts the type's own blocks (32 values, or a 256-value super-block).

def q4_0(raw):
    return nibbles_in_order(raw[:, 2:18])[:, None], half(raw, 0)[:, None], None


def q4_1(raw):
    return nibbles_in_order(raw[:, 4:20])[:, None], half(raw, 0)[:, None], half(raw, 2)[:, None]


def five_bits(raw, at_qh: int) -> np.ndarray:
    qh = raw[:, at_qh:at_qh + 4].copy().view(np.uint32)[:, 0]
    high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return nibbles_in_order(raw[:, at_qh + 4:at_qh + 20]) | (high << 4)


def q5_0(raw):
    return (five_bits(raw, 2) + 112)[:, None], half(raw, 0)[:, None], None  # q - 16 + 128


def q5_1(raw):
    return (five_bits(raw, 4) + 128)[:, None], half(raw, 0)[:, None], half(raw, 2)[:, None]


def q8_0(raw):
    return (raw[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)[:, None], half(raw, 0)[:, None], None


def q2_k(raw):
    scales, qs = raw[:, 0:16], raw[:, 16:80]
    d, dmin = half(raw, 80)[:, None], half(raw, 82)[:, None]
    q = low_bits(qs, (0, 2, 4, 6), 3).reshape(-1, 16, 16)  # value h*128 + shift*32 + l
    return q + 8, d * (scales & 0x0F), -(dmin * (scales >> 4))


def q3_k(raw):
    hmask, qs, packed = raw[:, 0:32], raw[:, 32:96], raw[:, 96:108]
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=-1)  # scales 0-7, 8-15
    high = (packed[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 2, 1).reshape(-1, 16) & 3
    sc = (low | (high << 4)).astype(np.float32) - 32
    ql = low_bits(qs, (0, 2, 4, 6), 3).reshape(-1, 16, 16)
    qh = high_bits(hmask, 8).reshape(-1, 16, 16)
    return ql + 4 * qh + 4, half(raw, 108)[:, None] * sc, None  # q = ql - 4 * (1 - h), code q + 8


def q4_k(raw):
    sc, m = k_scales(raw[:, 4:16])
    q = low_bits(raw[:, 16:144], (0, 4), 0x0F).reshape(-1, 8, 32)
    return q, half(raw, 0)[:, None] * sc, -(half(raw, 2)[:, None] * m)


def q5_k(raw):
    sc, m = k_scales(raw[:, 4:16])
    ql = low_bits(raw[:, 48:176], (0, 4), 0x0F).reshape(-1, 8, 32)
    qh = high_bits(raw[:, 16:48], 8)
    return (ql | (qh << 4)) + 128, half(raw, 0)[:, None] * sc, -(half(raw, 2)[:, None] * m)


def q6_k(raw):
    ql = low_bits(raw[:, 0:128], (0, 4), 0x0F, width=64).reshape(-1, 8, 32)  # [n, half, nibble, 64] in order
    qh = low_bits(raw[:, 128:192], (0, 2, 4, 6), 3).reshape(-1, 8, 32)
    sc = raw[:, 192:208].view(np.int8).astype(np.float32)
    q = ((ql | (qh << 4)) + 96).reshape(-1, 16, 16)  # q - 32 + 128
    return q, half(raw, 208)[:, None] * sc, None


def iq4_nl(raw):
    q = nibbles_in_order(raw[:, 2:18])
    return (IQ4_VALUES[q] + 128).astype(np.uint8)[:, None], half(raw, 0)[:, None], None


def iq4_xs(raw):
    scales_h = raw[:, 2:4].copy().view(np.uint16)[:, 0]
    scales_l = np.stack([raw[:, 4:8] & 0x0F, raw[:, 4:8] >> 4], axis=-1).reshape(-1, 8)
    high = ((scales_h[:, None] >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = (scales_l | (high << 4)).astype(np.float32) - 32
    q = np.concatenate([raw[:, 8:136].reshape(-1, 8, 16) & 0x0F, raw[:, 8:136].reshape(-1, 8, 16) >> 4], axis=-1)
    return (IQ4_VALUES[q] + 128).astype(np.uint8), half(raw, 0)[:, None] * ls, None


@dataclass(frozen=True)
class BlockType:
    """A GGUF type's block: its bytes, the values it holds, and how the codes read."""

    name: str
    nbytes: int
    values: int  # values per block of the file (32, or a 256-value super-block)
    block: int  # values per scale
    bits: int
    zero: int
    read: object


TYPES = {t.name: t for t in (
    BlockType("Q4_0", 18, 32, 32, 4, 8, q4_0),
    BlockType("Q4_1", 20, 32, 32, 4, 0, q4_1),
    BlockType("Q5_0", 22, 32, 32, 8, 128, q5_0),
    BlockType("Q5_1", 24, 32, 32, 8, 128, q5_1),
    BlockType("Q8_0", 34, 32, 32, 8, 128, q8_0),
    BlockType("Q2_K", 84, SUPER, 16, 4, 8, q2_k),
    BlockType("Q3_K", 110, SUPER, 16, 4, 8, q3_k),
    BlockType("Q4_K", 144, SUPER, 32, 4, 0, q4_k),
    BlockType("Q5_K", 176, SUPER, 32, 8, 128, q5_k),
    BlockType("Q6_K", 210, SUPER, 16, 8, 128, q6_k),
    BlockType("IQ4_NL", 18, 32, 32, 8, 128, iq4_nl),
    BlockType("IQ4_XS", 136, SUPER, 32, 8, 128, iq4_xs),
)}


def repack(kind: str, raw: np.ndarray) -> Blocks:
    """raw: the GGUF bytes of a matrix, uint8 [N, K/values * nbytes]."""
    t = TYPES[kind]
    n = raw.shape[0]
    codes, scales, mins = t.read(np.ascontiguousarray(raw).reshape(-1, t.nbytes))
    shape = (n, -1)
    return Blocks(t.bits, t.block, codes.astype(np.uint8).reshape(n, -1, t.block),
                  np.ascontiguousarray(scales, np.float32).reshape(shape), t.zero,
                  None if mins is None else np.ascontiguousarray(mins, np.float32).reshape(shape))


def stack(parts: list[Blocks]) -> Blocks:
    """Matrices of one type with the same K, their rows one after another: one kernel call for several."""
    first = parts[0]
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts])
    return Blocks(first.bits, first.block, np.concatenate([p.codes for p in parts]),
                  np.concatenate([p.scales for p in parts]), first.zero, mins)
