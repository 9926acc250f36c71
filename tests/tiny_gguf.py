"""Tiny Llama-family GGUF files written with the `gguf` package's writer, as llama.cpp writes them
(Q/K rows permuted for llama), plus the transformers-layout float weights they hold, for references."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass(frozen=True)
class TinyConfig:
    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    matrix_type: str = "Q4_1"
    table_type: str = "Q8_0"
    tied: bool = True
    types: tuple[tuple[str, str], ...] = ()  # (tensor suffix such as "attn_v", type): Q4_K_M-style mixes
    head_type: str | None = None  # an untied output.weight's type (default: matrix_type)
    vocabulary: str = "gpt2"  # or "llama": SentencePiece pieces with scores and byte fallback
    head_dim: int | None = None  # written as attention.key_length (qwen3 decouples it from hidden / heads)
    rotary_dim: int | None = None  # rope.dimension_count (phi3's partial rotary)
    window: int | None = None  # attention.sliding_window (gemma3's local layers)
    rope_base: float = 10000.0
    longrope: tuple[float, ...] = ()  # phi3's rope_factors_short (the long ones: twice these), original context 32
    rope_freqs: tuple[float, ...] = ()  # rope_freqs.weight: per-frequency divisors (Llama 3.x), head_dim / 2
    context: int = 128  # context_length

    def type_of(self, suffix: str) -> str:
        return dict(self.types).get(suffix, self.matrix_type)


K_QUANT = ("Q4_K_M", dict(hidden=256, heads=4, kv_heads=2, ffn=512, matrix_type="Q4_K", table_type="Q6_K",
                          types=(("attn_v", "Q6_K"), ("ffn_down", "Q6_K"), ("attn_output", "Q5_0"))))
SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,),
                "IQ4_NL": (0,)}  # byte offsets of a block's fp16 scale fields (types gguf-py cannot quantize)


def byte_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's byte-to-unicode alphabet as tokens, a few merges, then special tokens."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        table[b] = chr(b) if b in printable else chr(256 + (extra := extra + 1) - 1)
    tokens = [table[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    return tokens + ["Ġt", "he", "Ġthe", "in", "Ġa"], merges


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(bytes to write, the float32 values they hold)."""
    qtype = GGMLQuantizationType[kind]
    if kind == "F32":
        return w, w
    if kind == "Q8_K":  # a type of llama.cpp's activations, never of model files: gguf-py does not read it
        values, nbytes = GGML_QUANT_SIZES[qtype]
        return np.zeros((w.shape[0], w.shape[1] // values * nbytes), np.uint8), np.full(w.shape, np.nan, np.float32)
    if kind in SCALE_FIELDS:
        raw = random_blocks(w.shape, kind, np.random.default_rng(int(abs(w).sum() * 1e3) % 2**32), w.std())
    else:
        raw = quantize(w, qtype)
    return raw, dequantize(raw, qtype).astype(np.float32)


def random_blocks(shape: tuple[int, int], kind: str, rng, std: float) -> np.ndarray:
    """Random codes with valid fp16 scales, scaled so the weights have about `std` (gguf-py writes no K-quant)."""
    values, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (shape[0] * shape[1] // values, nbytes), dtype=np.uint8)
    # each block's scales of either sign: codes of one sign (Q4_K's 0..15 less a minimum) would otherwise
    # give every row the same mean direction, which real weights do not have, and activations explode
    spread = (rng.uniform(0.5, 1.5, raw.shape[0]) * rng.choice([-1, 1], raw.shape[0])).astype(np.float32)

    def set_scales(scale: float) -> np.ndarray:
        for at in SCALE_FIELDS[kind]:
            raw[:, at:at + 2] = (spread * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(shape[0], -1)

    unit = dequantize(set_scales(1.0), GGMLQuantizationType[kind])
    return set_scales(std / float(unit.std()))


def write_tiny_gguf(path: Path, cfg: TinyConfig = TinyConfig(), seed: int = 0) -> dict[str, np.ndarray]:
    """Writes the file; returns the float32 tensors (transformers' layout) it holds, by GGUF name."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), cfg.arch)
    if cfg.vocabulary == "llama":
        tokens = spm_vocab(w)
    else:
        tokens, merges = byte_vocab()
        tokens += SPECIAL
        byte_level_meta(w, tokens, merges)
    vocab, d = len(tokens), cfg.head_dim or cfg.hidden // cfg.heads
    meta(w, cfg, vocab)
    values: dict[str, np.ndarray] = {}

    def add(name: str, array: np.ndarray, kind: str, heads: int | None = None) -> None:
        permuted = heads is not None and cfg.arch in ("llama", "mistral")
        raw, held = stored(permute(array.astype(np.float32), heads) if permuted else array.astype(np.float32), kind)
        values[name] = unpermute(held, heads) if permuted else held
        w.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[kind])

    gain = 0.2 * np.sqrt(64 / cfg.hidden)  # weights ~ 1/sqrt(width), as trained models have: stable activations
    add("token_embd.weight", rng.standard_normal((vocab, cfg.hidden)) * 0.5, cfg.table_type)
    for i in range(cfg.layers):
        p, m = f"blk.{i}.", cfg.type_of
        add(p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(cfg.hidden), "F32")
        q = rng.standard_normal((cfg.heads * d, cfg.hidden)) * gain
        k = rng.standard_normal((cfg.kv_heads * d, cfg.hidden)) * gain
        v = rng.standard_normal((cfg.kv_heads * d, cfg.hidden)) * gain
        if cfg.arch == "phi3":  # one matrix for q, k, v (rows in that order)
            add(p + "attn_qkv.weight", np.concatenate([q, k, v]), m("attn_qkv"))
        else:
            add(p + "attn_q.weight", q, m("attn_q"), cfg.heads)
            add(p + "attn_k.weight", k, m("attn_k"), cfg.kv_heads)
            add(p + "attn_v.weight", v, m("attn_v"))
        if cfg.arch == "qwen2":
            for n, rows in (("q", cfg.heads * d), ("k", cfg.kv_heads * d), ("v", cfg.kv_heads * d)):
                add(p + f"attn_{n}.bias", 0.1 * rng.standard_normal(rows), "F32")
        if cfg.arch in ("qwen3", "gemma3"):
            add(p + "attn_q_norm.weight", 1 + 0.1 * rng.standard_normal(d), "F32")
            add(p + "attn_k_norm.weight", 1 + 0.1 * rng.standard_normal(d), "F32")
        add(p + "attn_output.weight", rng.standard_normal((cfg.hidden, cfg.heads * d)) * gain, m("attn_output"))
        if cfg.arch == "gemma3":  # norms after each branch too (GGUF holds 1 + w, as these do)
            add(p + "post_attention_norm.weight", 1 + 0.1 * rng.standard_normal(cfg.hidden), "F32")
            add(p + "post_ffw_norm.weight", 1 + 0.1 * rng.standard_normal(cfg.hidden), "F32")
        add(p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(cfg.hidden), "F32")
        gate, up = (rng.standard_normal((cfg.ffn, cfg.hidden)) * gain for _ in range(2))
        if cfg.arch == "phi3":  # one matrix: gate rows, then up rows
            add(p + "ffn_up.weight", np.concatenate([gate, up]), m("ffn_up"))
        else:
            add(p + "ffn_gate.weight", gate, m("ffn_gate"))
            add(p + "ffn_up.weight", up, m("ffn_up"))
        add(p + "ffn_down.weight", rng.standard_normal((cfg.hidden, cfg.ffn)) * gain, m("ffn_down"))
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(cfg.hidden), "F32")
    if cfg.longrope:
        add("rope_factors_short.weight", np.array(cfg.longrope), "F32")
        add("rope_factors_long.weight", 2 * np.array(cfg.longrope), "F32")
    if cfg.rope_freqs:  # as llama.cpp writes Llama 3.1's: 1 for high frequencies, up to the factor for low
        add("rope_freqs.weight", np.array(cfg.rope_freqs), "F32")
    if not cfg.tied:
        add("output.weight", rng.standard_normal((vocab, cfg.hidden)) * 0.5, cfg.head_type or cfg.matrix_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


SPM_PIECES = ["\u2581", "\u2581\u2581", "\u2581\u2581\u2581\u2581", "\u2581t", "he", "\u2581the", "in", "\u2581a",
              "at", "\u2581c", "\u2581cat", "an", "\u2581an", "er", "\u2581h", "\u2581hat", "ll", "\u2581he", "llo",
              "\u2581hello", "or", "\u2581w", "\u2581wor", "ld", "\u00e9", "\u2581caf", "\u2581caf\u00e9", "\u4e16",
              "\u754c", "\u4e16\u754c"] + list("abcdefghijklmnopqrstuvwxyzTH,.!?'0123456789")
SPM_SPECIAL = ["<unk>", "<s>", "</s>"]
SPM_USER = ["<|user|>", "<|assistant|>"]


def spm_vocab(w: GGUFWriter) -> list[str]:
    """A SentencePiece ("llama") vocabulary as llama.cpp reads it: <unk>, <s>, </s> (CONTROL), the 256 byte
    tokens (BYTE), pieces with distinct shuffled scores (NORMAL) and two USER_DEFINED tokens."""
    pieces = SPM_PIECES
    tokens = SPM_SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + pieces + SPM_USER
    scores = [0.0] * len(tokens)
    for rank, i in enumerate(np.random.default_rng(5).permutation(len(pieces))):
        scores[3 + 256 + int(i)] = -float(rank)
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4] * len(SPM_USER)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    return tokens


def byte_level_meta(w: GGUFWriter, tokens: list[str], merges: list[str]) -> None:
    vocab = len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - len(SPECIAL)) + [3] * len(SPECIAL))
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 3)
    w.add_chat_template(CHAT)


def meta(w: GGUFWriter, cfg: TinyConfig, vocab: int) -> None:
    if cfg.rotary_dim:
        w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.head_dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_block_count(cfg.layers)
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    if cfg.window:
        w.add_sliding_window(cfg.window)
    if cfg.longrope:  # context 128 of an original 32: transformers' attention factor sqrt(1 + ln 4 / ln 32)
        w.add_rope_scaling_orig_ctx_len(32)
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(4) / np.log(32))))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)


def converted(root: Path, cfg: TinyConfig = TinyConfig(), precision: str = "fp32", seed: int = 0) -> Path:
    """A tiny GGUF written under `root` and converted beside it: the model directory."""
    from hermes_ort.convert import convert_gguf

    write_tiny_gguf(root / "m.gguf", cfg, seed=seed)
    return convert_gguf(root / "m.gguf", root / "model", precision).directory
