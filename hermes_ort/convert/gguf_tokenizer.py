"""The tokenizer files of a converted model, built from the GGUF's vocabulary, merges and chat template.

Writes what hermes_ort.Tokenizer reads: tokenizer.json, tokenizer_config.json (special tokens, add_bos_token,
chat_template) and generation_config.json (the ids that end a generation). Two vocabulary kinds:

- `gpt2` (byte-level BPE): how text is split before BPE depends on the family (`tokenizer.ggml.pre`); the
  regexes are llama.cpp's.
- `llama` (SentencePiece, Llama 2, TinyLlama, Mistral v0.1-0.3, Gemma): llama.cpp merges the adjacent pair
  whose joined piece has the highest score, so a BPE whose merges are every (a, b) with a + b in the
  vocabulary, ranked by that piece's score, gives its ids; unknown characters fall back to <0xXX> byte
  tokens. Spaces become "▁" and one is put before the text and after every special token (llama.cpp's
  add_space_prefix: each piece between added tokens is normalized on its own, so Prepend does exactly that).
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


NORMAL, BYTE = 1, 6


class UnsupportedVocabulary(ConvertError):
    """A vocabulary kind not converted (the stages still run from token ids): a note, not an error."""
SPACE = "\u2581"  # ▁


def backend(model: GGUFModel):
    """A tokenizers.Tokenizer equal to llama.cpp's for the file's vocabulary."""
    kind = model.field("tokenizer.ggml.model")
    if kind == "llama":
        return sentencepiece(model)
    if kind != "gpt2":
        raise UnsupportedVocabulary(f"{model.path}: tokenizer model {kind!r} is not converted (byte-level BPE 'gpt2' and "
                           f"SentencePiece 'llama' are); the stages can still run from token ids")
    return byte_level(model)


def byte_level(model: GGUFModel):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = model.field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in model.field("tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    splits = SPLITS.get(model.field("tokenizer.ggml.pre", "default"), SPLITS["default"])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    add_specials(bpe, tokens, model.field("tokenizer.ggml.token_type") or [], user_defined_special=True)
    return bpe


def add_specials(bpe, tokens: list[str], types: list[int], user_defined_special: bool) -> None:
    """CONTROL tokens are special (matched in text, skipped when decoding); USER_DEFINED ones are matched
    in text as they are (llama.cpp parses both before tokenizing)."""
    from tokenizers import AddedToken

    bpe.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL or (t == USER_DEFINED and user_defined_special)])
    if not user_defined_special:
        bpe.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == USER_DEFINED])


def sentencepiece(model: GGUFModel):
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = model.field("tokenizer.ggml.tokens")
    scores = model.field("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ConvertError(f"{model.path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token "
                           f"({len(tokens)} tokens, {0 if scores is None else len(scores)} scores)")
    types = model.field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    unk = model.field("tokenizer.ggml.unknown_token_id")
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, spm_merges(tokens, scores, types),
                               unk_token=None if unk is None else tokens[unk], byte_fallback=True,
                               fuse_unk=True, ignore_merges=False))
    prefix = model.field("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    bpe.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    bpe.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    add_specials(bpe, tokens, types, user_defined_special=False)
    return bpe


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (a, b) whose join is a normal piece, best-scored join first (ties: the lower id)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, i in ids.items():
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in ids and b in ids:
                ranked.append((-float(scores[i]), i, ids[a], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


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
    spm = model.field("tokenizer.ggml.model") == "llama"  # llama.cpp adds BOS to SentencePiece text by default
    config = {"bos_token": text(ids["bos_token_id"]), "eos_token": text((ids["eos_token_id"] or [None])[0]),
              "pad_token": text(ids["pad_token_id"]), "chat_template": model.field("tokenizer.chat_template"),
              "add_bos_token": bool(model.field("tokenizer.ggml.add_bos_token", spm))}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    generation = {k: v for k, v in ids.items() if v not in (None, [])}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=1))
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
