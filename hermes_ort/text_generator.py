"""hermes_ort.TextGenerator: text in, text out through streamed stages, with the model directory's tokenizer
(each row's stable text: generation/text.py's RowText)."""
from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

import numpy as np

from .errors import InputError
from .generation.text import RowText
from .generation.tokenizer import Tokenizer
from .generation_api import stream as stream_tokens
from .session import InferenceSession


class TextGenerator:
    """`gen(prompt or prompts, max_new_tokens=..., **sampling) -> str | list[str]`, `gen.stream(prompt) ->
    Iterator[str]`. Sampling options and their defaults are transformers' (generation_config.json's when
    the model has one); several prompts are decoded together as one left-padded batch."""

    def __init__(self, model_dir: str | os.PathLike, memory_budget: int | str | None = None):
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.session = InferenceSession(model_dir, memory_budget=memory_budget)
        self.steps, self.first_token_at = 0, None  # of the latest generation: tokens per row, first one's clock

    def __call__(self, prompts: str | Sequence[str], max_new_tokens: int = 32, *, chat: bool = False,
                 stop: Sequence[str] = (), **sampling) -> str | list[str]:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = ["" for _ in texts]
        for pieces in self.pieces(texts, max_new_tokens, chat, stop, sampling):
            rows = [r + p for r, p in zip(rows, pieces)]
        return rows[0] if isinstance(prompts, str) else rows

    def stream(self, prompt: str, max_new_tokens: int = 32, *, chat: bool = False, stop: Sequence[str] = (),
               **sampling) -> Iterator[str]:
        """Yields text pieces of one prompt's continuation as its tokens arrive."""
        for (piece,) in self.pieces([prompt], max_new_tokens, chat, stop, sampling):
            if piece:
                yield piece

    def pieces(self, prompts: list[str], max_new_tokens: int, chat: bool, stop: Sequence[str],
               sampling: dict) -> Iterator[list[str]]:
        """Per step, the new stable text of every row; ends when every row has ended or at the limit."""
        ids, mask = self.batch([self.prompt_ids(p, chat, k) for k, p in enumerate(prompts)])
        eos = self.tokenizer.eos_token_ids
        rows = [RowText(self.tokenizer, stop) for _ in prompts]
        options = {**self.tokenizer.sampling_defaults(), **sampling}
        tokens = stream_tokens(self.session, ids, max_new_tokens, attention_mask=mask, eos_token_id=eos or None,
                               **options)
        self.steps, self.first_token_at = 0, None
        try:
            for step in tokens:
                self.steps += 1
                self.first_token_at = self.first_token_at or time.perf_counter()
                yield [row.add(int(t), eos) for row, t in zip(rows, step)]
                if all(row.finished for row in rows):
                    break
        finally:
            tokens.close()  # joins the engine's threads even when the caller stops early
        yield [row.flush() for row in rows]

    def prompt_ids(self, prompt: str, chat: bool, index: int) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt {index} is empty")
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        return self.tokenizer.encode_prompt(text)

    def batch(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask [B, longest]."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for k, row in enumerate(rows):
            ids[k, width - len(row):], mask[k, width - len(row):] = row, 1
        return ids, mask

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "TextGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
