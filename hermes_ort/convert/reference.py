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


def rotary(x: np.ndarray, positions: np.ndarray, s: LlamaSettings, local: bool = False) -> np.ndarray:
    """x [H, S, D] at positions [S], rotate-half layout over the first s.rotated values of each head."""
    if s.rotated < x.shape[-1]:
        return np.concatenate([rotary(x[..., :s.rotated], positions, s, local), x[..., s.rotated:]], -1)
    angles = positions[:, None].astype(np.float32) * inverse_frequencies(s, local)  # [S, D/2]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    if not local:
        cos, sin = cos * np.float32(s.rope_attention_factor), sin * np.float32(s.rope_attention_factor)
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
    q, k = rotary(q, positions, s, s.local(i)), rotary(k, positions, s, s.local(i))
    v = proj("v").reshape(seq, s.kv_heads, d).transpose(1, 0, 2)
    group = s.heads // s.kv_heads
    kk, vv = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # [H, S, D]
    scores = q @ kk.transpose(0, 2, 1) / np.sqrt(d)
    seen = np.tril(np.ones((seq, seq), bool))
    if s.local(i):  # query i sees key j when i - j < window
        seen &= np.subtract.outer(np.arange(seq), np.arange(seq)) < s.window
    scores = np.where(seen, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    context = (probs / probs.sum(-1, keepdims=True)) @ vv  # [H, S, D]
    attended = context.transpose(1, 0, 2).reshape(seq, -1) @ rows(p + "attn_output.weight").T
    if s.gemma:
        attended = rms_norm(attended, rows(p + "post_attention_norm.weight"), s.rms_eps)
    x = x + attended
    h = rms_norm(x, rows(p + "ffn_norm.weight"), s.rms_eps)
    if s.fused:
        gate, up = np.split(h @ rows(p + "ffn_up.weight").T, 2, axis=-1)
    else:
        gate, up = h @ rows(p + "ffn_gate.weight").T, h @ rows(p + "ffn_up.weight").T
    if s.gemma:  # GELU, tanh approximation
        act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
    else:
        act = gate / (1 + np.exp(-gate))
    down = (act * up) @ rows(p + "ffn_down.weight").T
    if s.gemma:
        down = rms_norm(down, rows(p + "post_ffw_norm.weight"), s.rms_eps)
    if s.local(i):  # what a sliding layer keeps for the next positions: the last window - 1
        k, v = k[:, -(s.window - 1):], v[:, -(s.window - 1):]
    return x + down, k, v


def logits(rows: Rows, s: LlamaSettings, ids: np.ndarray) -> np.ndarray:
    """The whole model on token ids [S]: logits [S, V]."""
    x = rows("token_embd.weight")[ids] * (np.float32(np.sqrt(s.hidden)) if s.gemma else 1)
    for i in range(s.layers):
        x = block(rows, i, s, x)[0]
    head = rows("token_embd.weight" if s.tied_head else "output.weight")
    return rms_norm(x, rows("output_norm.weight"), s.rms_eps) @ head.T
