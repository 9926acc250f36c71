"""Llama-family stages written with onnx.helper: embeddings, one graph per block, head parts.

Same decoder I/O as the GPT-2 exports, so generation, profiling and planning work unchanged:
embeddings (input_ids, position_ids [B, S], attention_mask [B, T] -> hidden.0 and what every block shares:
rotary.cos/sin [B, 1, S, D], attention.allowed [B, 1, group*S, T]), block i (hidden.i, those three,
past.i.key/value [B, KV, P, D] -> hidden.i+1, present.i.key/value [B, KV, P+S, D]), head parts
(hidden.L -> logits [B, S, V]). Computing the tables once, and running Q/K/V and gate/up as one matrix
each, keeps a block at ~half the nodes: at one token per step a block's time is mostly per-node cost. The block is transformers' LlamaDecoderLayer: RMSNorm, rotary on
Q and K (rotate-half layout), grouped-query attention with a causal and padding mask, SwiGLU.
How each matrix is stored (float32 MatMul or ORT's MatMulNBits) is the `Weights` object's business.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx

from .gguf_model import LlamaSettings
from .float_weights import split_outputs
from .onnx_builder import BOOL, FLOAT, FLOAT_MIN, GraphBuilder, value

B, S, T, P = "batch", "sequence", "total_sequence", "past_sequence"


class Weights(Protocol):
    """Emits a stage's weights: float32 initializers or quantized blocks."""

    def linear(self, g: GraphBuilder, x: str, name: str) -> str: ...  # x [.., in] -> [.., out]
    def linears(self, g: GraphBuilder, x: str, names: list[str]) -> list[str]: ...  # several outs, one matrix
    def vector(self, name: str) -> np.ndarray: ...  # a float32 norm weight or bias
    def lookup(self, g: GraphBuilder, ids: str) -> str: ...  # token_embd rows for ids [B, S] -> [B, S, E]
    def head_rows(self, g: GraphBuilder, x2d: str, start: int, stop: int) -> str: ...  # [N, E] -> [N, stop-start]


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float) -> str:
    return g.op("SimplifiedLayerNormalization", x, g.const(weight, "norm"), axis=-1, epsilon=eps)


def inverse_frequencies(s: LlamaSettings, local: bool = False) -> np.ndarray:
    """transformers' default rotary: 1 / base^(2i/D) in float32, divided by the linear scaling factor
    (local: gemma3's sliding layers, their own base and no scaling)."""
    d = s.rotated
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    base, factor = (s.local_rope_base, 1.0) if local else (s.rope_base, s.rope_linear_factor)
    inverse = np.float32(1.0) / np.float32(base) ** exponents / np.float32(factor)
    if s.rope_divisors:  # Llama 3.x: llama.cpp divides each frequency by rope_freqs.weight
        inverse = inverse / np.asarray(s.rope_divisors, np.float32)
    return inverse.astype(np.float32)


SHARED = ("rotary.cos", "rotary.sin", "attention.allowed")  # made by the embeddings stage, read by every block
LOCAL = ("rotary.local.cos", "rotary.local.sin", "attention.allowed.local")  # gemma3's sliding layers read these


def shared_names(s: LlamaSettings, layer: int | None = None) -> tuple[str, ...]:
    """What a block reads from the embeddings stage (layer None: what the embeddings stage gives)."""
    if layer is None:
        return SHARED + (LOCAL if any(s.local(i) for i in range(s.layers)) else ())
    return LOCAL if s.local(layer) else SHARED


def rotary_tables(g: GraphBuilder, s: LlamaSettings, local: bool = False) -> None:
    """rotary.cos and rotary.sin [B, 1, S, D] of position_ids [B, S] (local: rotary.local.*)."""
    positions = g.op("Unsqueeze", g.op("Cast", "position_ids", to=FLOAT), g.ints(-1))  # [B, S, 1]
    freqs = g.op("Mul", positions, g.const(inverse_frequencies(s, local), "inv_freq"))  # [B, S, D/2]
    angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.ints(1))  # [B, 1, S, D]
    cos, sin, _ = LOCAL if local else SHARED
    if s.rope_attention_factor != 1.0 and not local:  # longrope scales both tables
        factor = g.const(np.float32(s.rope_attention_factor), "attention_factor")
        g.op("Mul", g.op("Cos", angles), factor, outputs=[cos])
        g.op("Mul", g.op("Sin", angles), factor, outputs=[sin])
        return
    g.op("Cos", angles, outputs=[cos])
    g.op("Sin", angles, outputs=[sin])


def rotate(g: GraphBuilder, x: str, cos: str, sin: str, d: int, rotated: int | None = None) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] over the halves of the last axis; with
    `rotated` < d only the first `rotated` values of each head turn (phi3's partial rotary)."""
    if rotated and rotated < d:
        turned = rotate(g, g.op("Slice", x, g.ints(0), g.ints(rotated), g.ints(-1)), cos, sin, rotated)
        return g.op("Concat", turned, g.op("Slice", x, g.ints(rotated), g.ints(d), g.ints(-1)), axis=-1)
    first = g.op("Slice", x, g.ints(0), g.ints(d // 2), g.ints(-1))
    second = g.op("Slice", x, g.ints(d // 2), g.ints(d), g.ints(-1))
    half = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", half, sin))


def allowed_keys(g: GraphBuilder, s: LlamaSettings) -> None:
    """attention.allowed, bool [B, 1, group*S, T]: query i (at position T-S+i) sees key j when j <= T-S+i
    and key j is not padding; tiled for the `group` query heads that share a KV head."""
    total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(np.int64(1)), axis=0)
    seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(np.int64(1)), axis=0)
    one, zero = g.const(np.int64(1)), g.const(np.int64(0))
    queries = g.op("Unsqueeze", g.op("Range", g.op("Sub", total, seq), total, one), g.ints(1))  # [S, 1]
    keys = g.op("Unsqueeze", g.op("Range", zero, total, one), g.ints(0))  # [1, T]
    padding = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=BOOL), g.ints(1, 2))  # [B, 1, 1, T]
    allowed = g.op("And", g.op("LessOrEqual", keys, queries), padding)  # [B, 1, S, T]
    tiles = g.ints(1, 1, s.heads // s.kv_heads, 1)
    g.op("Tile", allowed, tiles, outputs=["attention.allowed"])
    if LOCAL[0] in shared_names(s):  # sliding layers: key j seen by query i when i - j < window
        near = g.op("Greater", keys, g.op("Sub", queries, g.const(np.int64(s.window), "window")))
        g.op("Tile", g.op("And", allowed, near), tiles, outputs=["attention.allowed.local"])


def heads(g: GraphBuilder, x: str, count: int, d: int) -> str:  # [B, S, count*D] -> [B, count, S, D]
    return g.op("Transpose", g.op("Reshape", x, g.ints(0, 0, count, d)), perm=[0, 2, 1, 3])


def attention(g: GraphBuilder, w: Weights, x: str, i: int, s: LlamaSettings) -> str:
    d, kv = s.head_dim, s.kv_heads
    q, k, v = projections(g, w, x, i, s)
    q, k = heads(g, q, s.heads, d), heads(g, k, kv, d)
    if s.qk_norm:  # qwen3: each head's q and k RMS-normed over head_dim before the rotary
        q = rms_norm(g, q, w.vector(f"blk.{i}.attn_q_norm.weight"), s.rms_eps)
        k = rms_norm(g, k, w.vector(f"blk.{i}.attn_k_norm.weight"), s.rms_eps)
    cos, sin, allowed = shared_names(s, i)
    q = rotate(g, q, cos, sin, d, s.rotated)  # [B, H, S, D]
    k = rotate(g, k, cos, sin, d, s.rotated)  # [B, KV, S, D]
    if s.local(i):  # a sliding layer keeps only its window's last window - 1 positions (see kept_cache)
        key, val, allowed = kept_cache(g, s, i, k, heads(g, v, kv, d), allowed)
    else:
        key = g.op("Concat", f"past.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])  # [B, KV, T, D]
        val = g.op("Concat", f"past.{i}.value", heads(g, v, kv, d), axis=2, outputs=[f"present.{i}.value"])
    # heads h = j*group + r share KV head j: queries as [B, KV, group*S, D], so no KV copy per head
    grouped = g.op("Reshape", q, g.ints(0, kv, -1, d))
    scores = g.op("Mul", g.op("MatMul", grouped, g.op("Transpose", key, perm=[0, 1, 3, 2])),
                  g.const(np.float32(1.0 / np.sqrt(d)), "scale"))  # [B, KV, group*S, T]
    masked = g.op("Where", allowed, scores, g.const(np.float32(FLOAT_MIN), "min"))
    context = g.op("Reshape", g.op("MatMul", g.op("Softmax", masked, axis=-1), val),
                   g.ints(0, s.heads, -1, d))  # [B, H, S, D]
    merged = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), g.ints(0, 0, s.heads * d))
    return w.linear(g, merged, f"blk.{i}.attn_output.weight")


def kept_cache(g: GraphBuilder, s: LlamaSettings, i: int, k: str, v: str, allowed: str) -> tuple[str, str, str]:
    """A sliding layer's keys and values: its past (at most window - 1 positions) and the new ones attend,
    with the last columns of the local mask, and its present keeps the last window - 1: the next query
    sees no further back, so the cache is bounded by the window, not the context."""
    key = g.op("Concat", f"past.{i}.key", k, axis=2)
    val = g.op("Concat", f"past.{i}.value", v, axis=2)
    seen = g.op("Slice", g.op("Shape", key), g.ints(2), g.ints(3))  # [1]: past + new positions
    allowed = g.op("Slice", allowed, g.op("Neg", seen), g.ints(np.iinfo(np.int64).max), g.ints(3))
    keep, end, axis = g.ints(-(s.window - 1)), g.ints(np.iinfo(np.int64).max), g.ints(2)
    g.op("Slice", key, keep, end, axis, outputs=[f"present.{i}.key"])
    g.op("Slice", val, keep, end, axis, outputs=[f"present.{i}.value"])
    return key, val, allowed


def projections(g: GraphBuilder, w: Weights, x: str, i: int, s: LlamaSettings) -> list[str]:
    """q [B, S, H*D], k and v [B, S, KV*D]: one matrix, biases added (qwen2) before the split."""
    names = [f"blk.{i}.attn_{n}" for n in "qkv"]
    sizes = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
    if s.fused:  # phi3: the file's one matrix
        return split_outputs(g, w.linear(g, x, f"blk.{i}.attn_qkv.weight"), sizes)
    if not s.qkv_bias:
        return w.linears(g, x, [n + ".weight" for n in names])
    fused = w.linears(g, x, [f"{n}.weight" for n in names], split=False)
    bias = np.concatenate([w.vector(n + ".bias") for n in names])
    return g.op("Split", g.op("Add", fused, g.const(bias, "bias")), g.ints(*sizes), axis=-1, outputs=3)


def block(w: Weights, i: int, s: LlamaSettings) -> onnx.ModelProto:
    g = GraphBuilder(f"block_{i:02d}")
    hidden = f"hidden.{i}"
    normed = rms_norm(g, hidden, w.vector(f"blk.{i}.attn_norm.weight"), s.rms_eps)
    attended = attention(g, w, normed, i, s)
    if s.gemma:  # gemma3 norms each branch's output as well (its GGUF norms hold 1 + w: used as stored)
        attended = rms_norm(g, attended, w.vector(f"blk.{i}.post_attention_norm.weight"), s.rms_eps)
    mid = g.op("Add", hidden, attended)
    x = rms_norm(g, mid, w.vector(f"blk.{i}.ffn_norm.weight"), s.rms_eps)
    if s.fused:  # phi3: ffn_up holds gate then up
        gate, up = split_outputs(g, w.linear(g, x, f"blk.{i}.ffn_up.weight"), [s.ffn, s.ffn])
    else:
        gate, up = w.linears(g, x, [f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"])
    if s.gemma:  # GELU, tanh approximation (com.microsoft FastGelu is that formula)
        act = g.op("Mul", g.op("FastGelu", gate, domain="com.microsoft"), up)
    else:
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    down = w.linear(g, act, f"blk.{i}.ffn_down.weight")
    if s.gemma:
        down = rms_norm(g, down, w.vector(f"blk.{i}.post_ffw_norm.weight"), s.rms_eps)
    g.op("Add", mid, down, outputs=[f"hidden.{i + 1}"])
    past = [B, s.kv_heads, P, s.head_dim]
    present = [B, s.kv_heads, "kept_sequence" if s.local(i) else T, s.head_dim]
    inputs = [value(hidden, np.float32, [B, S, s.hidden]), *shared_values(s, shared_names(s, i)),
              value(f"past.{i}.key", np.float32, past), value(f"past.{i}.value", np.float32, past)]
    outputs = [value(f"hidden.{i + 1}", np.float32, [B, S, s.hidden]),
               value(f"present.{i}.key", np.float32, present), value(f"present.{i}.value", np.float32, present)]
    return g.model(inputs, outputs)


def shared_values(s: LlamaSettings, names: tuple[str, ...]) -> list[onnx.ValueInfoProto]:
    table = [B, 1, S, s.rotated]
    return [value(n, np.bool_, [B, 1, "group_sequence", T]) if n.startswith("attention.") else
            value(n, np.float32, table) for n in names]


def embeddings(w: Weights, s: LlamaSettings) -> onnx.ModelProto:
    g = GraphBuilder("embeddings")
    rows = w.lookup(g, "input_ids")
    if s.gemma:  # gemma scales the embeddings by sqrt(hidden), in float32
        rows = g.op("Mul", rows, g.const(np.float32(np.sqrt(s.hidden)), "embed_scale"))
    g.op("Identity", rows, outputs=["hidden.0"])
    rotary_tables(g, s)
    if LOCAL[0] in shared_names(s):
        rotary_tables(g, s, local=True)
    allowed_keys(g, s)
    inputs = [value("input_ids", np.int64, [B, S]), value("position_ids", np.int64, [B, S]),
              value("attention_mask", np.int64, [B, T])]
    return g.model(inputs, [value("hidden.0", np.float32, [B, S, s.hidden]), *shared_values(s, shared_names(s))])


def head_part(w: Weights, s: LlamaSettings, j: int, splits: list[tuple[int, int]]) -> onnx.ModelProto:
    """Logits for vocabulary rows [start, stop). Part 0 applies the final norm and (when there are more
    parts) passes `hidden.final` on; the last part concatenates every part's logits into `logits`."""
    g = GraphBuilder(f"head_{j:02d}")
    first, last, rows = j == 0, j == len(splits) - 1, splits[j]
    source = f"hidden.{s.layers}"
    hidden = rms_norm(g, source, w.vector("output_norm.weight"), s.rms_eps) if first else "hidden.final"
    if first and not last:
        g.op("Identity", hidden, outputs=["hidden.final"])
    flat = g.op("Reshape", hidden, g.ints(-1, s.hidden))
    batch_seq = g.op("Slice", g.op("Shape", hidden), g.ints(0), g.ints(2))
    logits = g.op("Reshape", w.head_rows(g, flat, *rows), g.op("Concat", batch_seq, g.ints(-1), axis=0))
    earlier = [f"logits.{p}" for p in range(j)] if last else []
    name = "logits" if last else f"logits.{j}"
    g.op("Concat", *earlier, logits, axis=-1, outputs=[name]) if earlier else g.op("Identity", logits, outputs=[name])
    seq = lambda n, width: value(n, np.float32, [B, S, width])
    inputs = [seq(source, s.hidden)] if first else [seq("hidden.final", s.hidden)] + [
        seq(f"logits.{p}", splits[p][1] - splits[p][0]) for p in range(j) if last]
    outputs = ([seq("hidden.final", s.hidden)] if first and not last else []) + [
        seq(name, s.vocab if last else rows[1] - rows[0])]
    return g.model(inputs, outputs)
