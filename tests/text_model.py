"""A tiny GPT-2 with a real (trained here) byte-level BPE tokenizer and a chat template, as a local
transformers folder: what the text tests and the runtime-only CI check export and generate from.

python tests/text_model.py OUT_DIR  (needs torch and transformers) exports it to OUT_DIR.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Streaming stages through ONNX Runtime on a board.",
          "héllo wörld, ça va? 😀 naïve café", "A man is eating a piece of bread."] * 50
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_folder(folder: Path) -> Path:
    """Tokenizer trained on CORPUS, a seeded GPT-2 whose vocabulary is the tokenizer's, and the configs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, initializer_range=0.2, bos_token_id=0,
                               eos_token_id=0,
                               vocab_size=tokenizer.get_vocab_size())).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHAT}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "do_sample": False}))
    return folder


def export_text_model(out: Path) -> Path:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hermes_ort_export.build import export_model

    with tempfile.TemporaryDirectory() as scratch:
        export_model(str(write_folder(Path(scratch) / "gpt2")), out, progress=False)
    return out


if __name__ == "__main__":
    print(export_text_model(Path(sys.argv[1])))
