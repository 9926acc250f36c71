"""python -m bench.random_gguf OUT.gguf [--shape tinyllama-1.1b] [--mix Q4_K_M] [--seed 0]: a GGUF of a public
model's shapes with seeded random weights, written as llama.cpp's quantization mixes lay their types out, so
speed and memory can be measured on the file a user downloads, with no model hub (no torch needed).

Q4_K_M (llama.cpp's llama-quant.cpp): Q4_K matrices; Q6_K for the output (or a tied token_embd) and for
attn_v and ffn_down in the first and last eighth of the layers and every third one between; a row length that
is not a multiple of 256 falls back to Q5_0 (Q8_0 where Q6_K was due). Codes are uniform random, each
block's fp16 scales of either sign and sized so the weights have a trained model's spread (std 0.02); norms
are ones. The vocabulary is a
SentencePiece one (<unk>, <s>, </s>, 256 byte tokens, then pieces), so llama.cpp loads the file.
"""
from __future__ import annotations

import argparse

import numpy as np

from hermes_ort.convert.gguf_model import LlamaSettings


SHAPES = {  # the settings hermes convert reads back from the file
    "tinyllama-1.1b": LlamaSettings("llama", 22, 2048, 32, 4, 5632, 32000, 2048, 10000.0, 1e-5, tied_head=False),
    "smollm2-135m": LlamaSettings("llama", 30, 576, 9, 3, 1536, 49152, 2048, 100000.0, 1e-5, tied_head=True),
}
SCALES = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,), "Q8_0": (0,)}  # byte offsets of each block's fp16 fields


FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's types for rows that are not a multiple of 256


def q4_k_m_type(name: str, layer: int | None, layers: int, row: int, tied: bool) -> str:
    """The type llama.cpp's Q4_K_M gives a tensor (its use_more_bits rule for attn_v and ffn_down)."""
    kind = "Q4_K"
    if name == "output.weight" or (name == "token_embd.weight" and tied):
        kind = "Q6_K"
    elif layer is not None and name.split(".")[-2] in ("attn_v", "ffn_down"):
        more = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
        kind = "Q6_K" if more else "Q4_K"
    return FALLBACK[kind] if row % 256 else kind


def random_blocks(rows: int, k: int, kind: str, rng, std: float = 0.02) -> np.ndarray:
    """Random codes, fp16 scales of either sign, scaled (on a sample) to weights of about `std`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[kind]
    values, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * k // values, nbytes), dtype=np.uint8)
    sign = rng.choice(np.array([-1, 1], np.float32), raw.shape[0]) * rng.uniform(0.5, 1.5, raw.shape[0]).astype(
        np.float32)

    def set_scales(scale: float) -> None:
        for at in SCALES[kind]:
            raw[:, at:at + 2] = (sign * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)

    set_scales(1.0)
    sample = dequantize(raw[:4096], qtype)
    set_scales(std / float(sample.std()))
    return raw.reshape(rows, -1)


def vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(size - len(tokens))]
    scores = [0.0] * 259 + [-float(i) for i in range(size - 259)]
    return tokens, scores, [2, 3, 3] + [6] * 256 + [1] * (size - 259)


def write(path: str, shape: LlamaSettings, seed: int = 0) -> dict[str, int]:
    """Writes the file; returns how many tensors took each type."""
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, "llama")
    w.add_name(f"random {path}")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(shape.vocab)
    tokens, scores, types = vocabulary(shape.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    counts: dict[str, int] = {}

    def add(name: str, rows: int, k: int, layer: int | None = None) -> None:
        kind = q4_k_m_type(name, layer, shape.layers, k, shape.tied_head)
        counts[kind] = counts.get(kind, 0) + 1
        w.add_tensor(name, random_blocks(rows, k, kind, rng), raw_dtype=GGMLQuantizationType[kind])

    def ones(name: str) -> None:
        counts["F32"] = counts.get("F32", 0) + 1
        w.add_tensor(name, np.ones(shape.hidden, np.float32))

    d = shape.hidden // shape.heads
    add("token_embd.weight", shape.vocab, shape.hidden)
    for i in range(shape.layers):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight")
        add(p + "attn_q.weight", shape.hidden, shape.hidden, i)
        add(p + "attn_k.weight", shape.kv_heads * d, shape.hidden, i)
        add(p + "attn_v.weight", shape.kv_heads * d, shape.hidden, i)
        add(p + "attn_output.weight", shape.hidden, shape.hidden, i)
        ones(p + "ffn_norm.weight")
        add(p + "ffn_gate.weight", shape.ffn, shape.hidden, i)
        add(p + "ffn_up.weight", shape.ffn, shape.hidden, i)
        add(p + "ffn_down.weight", shape.hidden, shape.ffn, i)
    ones("output_norm.weight")
    if not shape.tied_head:
        add("output.weight", shape.vocab, shape.hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.random_gguf", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--mix", choices=["Q4_K_M"], default="Q4_K_M")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts = write(args.out, SHAPES[args.shape], args.seed)
    print(f"wrote {args.out}: {args.shape} shapes, {args.mix} mix, tensors by type {counts}")


if __name__ == "__main__":
    main()
