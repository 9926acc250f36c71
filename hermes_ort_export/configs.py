"""Model sizes: one name -> (family, config settings) table. Public architecture numbers, random weights."""
from __future__ import annotations

from hermes_ort.errors import HermesError

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)

NAMED: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12)),  # 124M params
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16)),  # 355M
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20)),  # 774M
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25)),  # 1.56B
    "bert-base": ("bert", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                               intermediate_size=3072)),  # 110M
    "bert-large": ("bert", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                intermediate_size=4096)),  # 335M
    "vit-base": ("vit", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                             intermediate_size=3072, num_labels=1000)),  # 86M, ImageNet classifier head
    "vit-large": ("vit", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                              intermediate_size=4096, num_labels=1000)),  # 304M
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=2048, n_positions=128,
                                bos_token_id=0, eos_token_id=0,
                                initializer_range=0.2)),  # 0.2M; weights 10x GPT-2's scale, so greedy
    # continuations vary from token to token (at 0.02 they repeat one id) and a wrong KV cache shows
    "small-gpt2": ("gpt2", dict(n_layer=8, n_embd=512, n_head=8, vocab_size=8192, n_positions=256,
                                bos_token_id=0, eos_token_id=0)),  # 29M: memory-budget tests in a subprocess
    "tinyllama-1.1b": ("llama", dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                     max_position_embeddings=2048, rms_norm_eps=1e-5)),  # 1.1B
    "qwen2.5-0.5b": ("qwen2", dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                                   rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),  # 0.5B
    "tiny-llama": ("llama", dict(TINY, num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                                 initializer_range=0.2)),  # 0.1M, 2 query heads per KV head
    "tiny-qwen2": ("qwen2", dict(TINY, num_key_value_heads=1, vocab_size=512, max_position_embeddings=128,
                                 tie_word_embeddings=True, initializer_range=0.2)),  # biases on q/k/v, tied
    "tiny-mistral": ("mistral", dict(TINY, num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                                     initializer_range=0.2)),
    "tiny-bert": ("bert", dict(TINY, vocab_size=1000, max_position_embeddings=128)),  # 0.1M
    "tiny-vit": ("vit", dict(TINY, image_size=32, patch_size=8, num_labels=10)),  # 0.07M
}


HUB: dict[str, str] = {  # table names that are published models: their Hugging Face repository
    "gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
    "bert-base": "google-bert/bert-base-uncased", "bert-large": "google-bert/bert-large-uncased",
    "vit-base": "google/vit-base-patch16-224", "vit-large": "google/vit-large-patch16-224",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
}


def named(name: str) -> tuple[str, dict]:
    """(family, settings) for a table name; an unknown name lists the known ones."""
    if name not in NAMED:
        raise HermesError(f"unknown model '{name}': known names are {', '.join(NAMED)}, or give a local "
                          "transformers model folder")
    return NAMED[name]
