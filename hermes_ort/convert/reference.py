"""A numpy Llama forward written from the architecture's definition, not from our graphs: the converter
checks every block and the chained stages against it before publishing."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .gguf_model import LlamaSettings
from .llama_graph import inverse_frequencies

Rows = Callable[[str], np.ndarray]  # a GGUF tensor name -> float32 [out, in] or [n]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotary(x: np.ndarray, positions: np.ndarray, s: LlamaSettings) -> np.ndarray:
    """x [H, S, D] at positions [S], rotate-half layout over the first s.rotated values of each head."""
    if s.rotated < x.shape[-1]:
        return np.concatenate([rotary(x[..., :s.rotated], positions, s), x[..., s.rotated:]], -1)
    angles = positions[:, None].astype(np.float32) * inverse_frequencies(s)  # [S, D/2]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def block(rows: Rows, i: int, s: LlamaSettings, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer on x [S, E] at positions 0..S-1 with no past: (hidden out, key [KV, S, D], value)."""
    p, d, seq = f"blk.{i}.", s.head_dim, x.shape[0]
    positions = np.arange(seq)
    h = rms_norm(x, rows(p + "attn_norm.weight"), s.rms_eps)
    if s.fused:  # phi3: q, k, v rows one after another in attn_qkv
        qkv = h @ rows(p + "attn_qkv.weight").T
        parts = dict(zip("qkv", np.split(qkv, [s.heads * d, (s.heads + s.kv_heads) * d], axis=-1)))
        proj = lambda n: parts[n]
    else:
        proj = lambda n: h @ rows(p + f"attn_{n}.weight").T + (rows(p + f"attn_{n}.bias") if s.qkv_bias else 0)
    q = proj("q").reshape(seq, s.heads, d).transpose(1, 0, 2)
    k = proj("k").reshape(seq, s.kv_heads, d).transpose(1, 0, 2)
    if s.qk_norm:
        q, k = rms_norm(q, rows(p + "attn_q_norm.weight"), s.rms_eps), rms_norm(k, rows(p + "attn_k_norm.weight"), s.rms_eps)
    q, k = rotary(q, positions, s), rotary(k, positions, s)
    v = proj("v").reshape(seq, s.kv_heads, d).transpose(1, 0, 2)
    group = s.heads // s.kv_heads
    kk, vv = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # [H, S, D]
    scores = q @ kk.transpose(0, 2, 1) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    context = (probs / probs.sum(-1, keepdims=True)) @ vv  # [H, S, D]
    x = x + context.transpose(1, 0, 2).reshape(seq, -1) @ rows(p + "attn_output.weight").T
    h = rms_norm(x, rows(p + "ffn_norm.weight"), s.rms_eps)
    if s.fused:
        gate, up = np.split(h @ rows(p + "ffn_up.weight").T, 2, axis=-1)
    else:
        gate, up = h @ rows(p + "ffn_gate.weight").T, h @ rows(p + "ffn_up.weight").T
    return x + (gate / (1 + np.exp(-gate)) * up) @ rows(p + "ffn_down.weight").T, k, v


def logits(rows: Rows, s: LlamaSettings, ids: np.ndarray) -> np.ndarray:
    """The whole model on token ids [S]: logits [S, V]."""
    x = rows("token_embd.weight")[ids]
    for i in range(s.layers):
        x = block(rows, i, s, x)[0]
    head = rows("token_embd.weight" if s.tied_head else "output.weight")
    return rms_norm(x, rows("output_norm.weight"), s.rms_eps) @ head.T
