"""hermes_ort.Tokenizer: a model directory's tokenizer read with the `tokenizers` package alone (no
transformers), its special tokens, generation defaults and chat template.

Reads what `python -m export` copies from the source folder: tokenizer.json (required), and when present
tokenizer_config.json (special tokens, chat_template), chat_template.jinja and generation_config.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, ManifestError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path} is corrupt: {e}") from e


def token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} records."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass
class Tokenizer:
    """encode / decode text, the ids that end a generation, and chat prompts."""

    backend: object  # tokenizers.Tokenizer
    config: dict = field(default_factory=dict)  # tokenizer_config.json
    generation: dict = field(default_factory=dict)  # generation_config.json
    chat_template: str | None = None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{directory} has no tokenizer.json: give token ids instead of text")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers package raises its own Exception types
            raise ManifestError(f"{path} cannot be read: {e}") from e
        config = read_json(directory / "tokenizer_config.json")
        template = directory / "chat_template.jinja"
        chat = template.read_text() if template.is_file() else config.get("chat_template")
        return cls(backend, config, read_json(directory / "generation_config.json"), chat)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """encode(), with the BOS token first where the vocabulary asks for it (tokenizer_config's
        add_bos_token: SentencePiece models such as Llama 2 are trained so) and the text has none."""
        ids = self.encode(text)
        bos = self.token_id(token_text(self.config.get("bos_token")))
        if self.config.get("add_bos_token") and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.backend.token_to_id(text)

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config.json's eos_token_id (one or several), else the tokenizer's eos token."""
        given = self.generation.get("eos_token_id")
        if given is not None:
            return [int(i) for i in (given if isinstance(given, list) else [given])]
        found = self.token_id(token_text(self.config.get("eos_token")))
        return [] if found is None else [found]

    @property
    def pad_token_id(self) -> int:
        """What fills the left of shorter prompts (masked out, so any id works): pad, else eos, else 0."""
        pad = self.generation.get("pad_token_id", self.token_id(token_text(self.config.get("pad_token"))))
        return int(pad if pad is not None else (self.eos_token_ids or [0])[0])

    def sampling_defaults(self) -> dict:
        """The sampling settings generation_config.json gives (transformers' defaults for the rest)."""
        return {k: self.generation[k] for k in SAMPLING_KEYS if k in self.generation}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders messages ([{"role": ..., "content": ...}]) as transformers does: jinja2's sandbox,
        trim_blocks and lstrip_blocks, the special tokens as variables."""
        if not self.chat_template:
            raise InputError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tokens = {k: token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            return env.from_string(self.chat_template).render(messages=messages,
                                                              add_generation_prompt=add_generation_prompt, **tokens)
        except TemplateError as e:
            raise InputError(f"chat template: {e}") from e
