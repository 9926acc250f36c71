"""Tiny random GGUF models of each family against transformers' own GGUF loader (an independent reading of
the file: its dequantization, Q/K permutation and architecture): fp32 conversions give its logits within
1e-3, native ones at float32 arithmetic its top-1 tokens (and at int8 activations, the default, wherever
the top two are further apart than the int8 deviation). Needs torch and transformers (installed by .ci/run)."""
from __future__ import annotations

import numpy as np
import pytest

import hermes_ort
from hermes_ort.convert import convert_gguf

from tiny_gguf import K_QUANT, TinyConfig, write_tiny_gguf

torch = pytest.importorskip("torch", reason="torch is needed for transformers' reference logits")
transformers = pytest.importorskip("transformers", reason="transformers reads the GGUF as an independent reference")

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def llama3_divisors() -> tuple[float, ...]:
    """rope_freqs.weight as llama.cpp's converter writes it: default frequency / Llama 3's scaled one."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      rope_parameters=LLAMA3_ROPE)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    return tuple((default / scaled.numpy().astype(np.float64)).tolist())


PHI3_SHORT = tuple(np.linspace(1.0, 3.0, 8).tolist())  # phi3's rope_factors_short, one per frequency
FAMILIES = {  # name -> (file, transformers' config overrides: what its GGUF loader does not read)
    "llama-q4_k_m": (lambda: TinyConfig(**K_QUANT[1]), {}),
    "qwen2-untied": (lambda: TinyConfig(arch="qwen2", tied=False), {}),
    "qwen3": (lambda: TinyConfig(arch="qwen3", head_dim=128, matrix_type="Q8_0"), {}),
    "phi3-partial-rotary": (lambda: TinyConfig(arch="phi3", tied=False, rotary_dim=12, matrix_type="Q4_0"),
                            {"pad_token_id": 0,  # its default 32000 lies past the tiny vocabulary
                             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.75}}),  # rope.dimension_count 12 of 16
    "gemma3-sliding": (lambda: TinyConfig(arch="gemma3", layers=6, window=4, rope_base=1e6, head_dim=16),
                       {"query_pre_attn_scalar": 16}),  # = head_dim, as llama.cpp scales (its GGUF has no key)
    "phi3-longrope": (lambda: TinyConfig(arch="phi3", tied=False, longrope=PHI3_SHORT),
                      {"pad_token_id": 0, "original_max_position_embeddings": 32, "rope_parameters": {
                          "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": list(PHI3_SHORT),
                          "long_factor": [2 * f for f in PHI3_SHORT], "original_max_position_embeddings": 32}}),
    "llama3-rope-freqs": (lambda: TinyConfig(rope_freqs=llama3_divisors()), {"rope_parameters": LLAMA3_ROPE}),
}
IDS = np.array([5, 17, 260, 99, 3, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])


def logits(directory, cfg: TinyConfig) -> np.ndarray:
    d = cfg.head_dim or cfg.hidden // cfg.heads
    with hermes_ort.InferenceSession(directory) as session:
        feed = {"input_ids": IDS[None], "position_ids": np.arange(len(IDS))[None],
                "attention_mask": np.ones((1, len(IDS)), np.int64),
                **{t.name: np.zeros((1, cfg.kv_heads, 0, d), np.float32)
                   for t in session.manifest.inputs if t.name.startswith("past.")}}
        return session.run(["logits"], feed)[0][0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(tmp_path, family):
    make, overrides = FAMILIES[family]
    cfg = make()
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32,
                                                              **overrides).eval()
    with torch.no_grad():
        want = model(torch.tensor(IDS[None])).logits[0].numpy()
    fp32 = logits(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "fp32", "fp32").directory, cfg)
    assert np.abs(fp32 - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
    exact = logits(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "native0", "native", 0).directory, cfg)
    assert np.array_equal(exact.argmax(-1), want.argmax(-1))  # the file's weights exactly, float32 arithmetic
    assert np.abs(exact - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
    int8 = logits(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "native").directory, cfg)  # the default, level 4
    deviation = np.abs(int8 - want).max()
    top2 = np.sort(want, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * deviation  # where int8 activations cannot swap the two best
    assert clear.sum() >= len(IDS) // 4 and np.array_equal(int8.argmax(-1)[clear], want.argmax(-1)[clear])
