"""The tokenizer files of a converted model, built from the GGUF's vocabulary, merges and chat template.

Writes what hermes_ort.Tokenizer reads: tokenizer.json (a `tokenizers` byte-level BPE), tokenizer_config.json
(special tokens, chat_template) and generation_config.json (the ids that end a generation). How text is
split before BPE depends on the model family (`tokenizer.ggml.pre`); the regexes are llama.cpp's.
"""
from __future__ import annotations

import json
from pathlib import Path

from .gguf_model import ConvertError, GGUFModel

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLITS = {  # tokenizer.ggml.pre -> regexes applied in turn (isolated matches), then bytes -> BPE
    "default": [GPT2_SPLIT], "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "qwen2": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+"],
    "llama-bpe": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
CONTROL, USER_DEFINED = 3, 4  # token types that are special tokens
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>")  # chat templates end a turn with one of these


def backend(model: GGUFModel):
    """A tokenizers.Tokenizer equal to llama.cpp's for `gpt2`-type (byte-level BPE) vocabularies."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = model.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(f"{model.path}: tokenizer model {kind!r} is not converted (only byte-level BPE, "
                           f"'gpt2'); the stages can still run from token ids")
    tokens = model.field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in model.field("tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    splits = SPLITS.get(model.field("tokenizer.ggml.pre", "default"), SPLITS["default"])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    types = model.field("tokenizer.ggml.token_type") or []
    bpe.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)])
    return bpe


def special_ids(model: GGUFModel, tokens: list[str]) -> dict:
    """bos / eos / pad ids from the metadata; a chat template's end-of-turn token also ends a generation."""
    get = lambda key: model.field(f"tokenizer.ggml.{key}_token_id")
    ends = [i for i in (get("eos"), get("eot")) if i is not None]
    template = model.field("tokenizer.chat_template") or ""
    ends += [tokens.index(t) for t in TURN_ENDS if t in template and t in tokens]
    return {"bos_token_id": get("bos"), "eos_token_id": list(dict.fromkeys(int(i) for i in ends)),
            "pad_token_id": get("padding")}


def write_tokenizer(model: GGUFModel, directory: Path) -> list[str]:
    """Writes the tokenizer files into directory; returns their names."""
    tokens = model.field("tokenizer.ggml.tokens")
    backend(model).save(str(directory / "tokenizer.json"))
    ids = special_ids(model, tokens)
    text = lambda i: tokens[i] if i is not None else None
    config = {"bos_token": text(ids["bos_token_id"]), "eos_token": text((ids["eos_token_id"] or [None])[0]),
              "pad_token": text(ids["pad_token_id"]), "chat_template": model.field("tokenizer.chat_template"),
              "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    generation = {k: v for k, v in ids.items() if v not in (None, [])}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=1))
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
