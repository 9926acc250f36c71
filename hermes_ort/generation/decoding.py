"""One generation's state through streamed stages: the KV cache layout, left-padded prompts, each step's feed.

Works on any manifest that takes input_ids, position_ids, attention_mask and `past.<i>.key/value` and
gives logits and `present.<i>.key/value` (what `python -m export gpt2...` writes). Prompts of different
lengths share one batch LEFT-padded, as transformers batches GPT-2: the mask marks real tokens and
position ids count them (`cumsum(mask) - 1`, pads at 1), so each row gets the tokens it gets alone.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import InputError
from ..engine.inputs import check_indices
from .cache_buffers import CacheBuffers
from .cache_layout import DECODER_INPUTS, CacheLayout

__all__ = ["DECODER_INPUTS", "CacheLayout", "Decoder", "check_prompt", "cut_positions", "prompt_positions",
           "step_feed"]


def step_feed(ids: np.ndarray, past: dict[str, np.ndarray], past_length: int) -> dict[str, np.ndarray]:
    """Inputs for unpadded tokens ids [B, S] that follow past_length cached positions."""
    batch, length = ids.shape
    positions = np.broadcast_to(np.arange(past_length, past_length + length, dtype=np.int64), (batch, length))
    return {"input_ids": ids, "position_ids": positions.copy(),
            "attention_mask": np.ones((batch, past_length + length), np.int64), **past}


def check_prompt(input_ids, attention_mask, max_new_tokens: int, layout: CacheLayout) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) as int64 [B, S]; refuses what would decode wrongly, naming the row or the limit."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer [batch, sequence] with both > 0, got {ids.dtype} "
                         f"{list(ids.shape)}")
    mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    for row in np.flatnonzero((np.diff(mask, axis=1) < 0).any(axis=1) | (mask[:, -1] == 0)):
        raise InputError(f"row {row} of attention_mask is padded on the right; pad prompts on the LEFT")
    if layout.vocab:
        check_indices("input_ids", ids, layout.vocab)
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if layout.max_positions and ids.shape[1] + max_new_tokens > layout.max_positions:
        raise InputError(f"a prompt of {ids.shape[1]} positions plus {max_new_tokens} new tokens exceeds the "
                         f"model's {layout.max_positions} positions")
    return ids.astype(np.int64, copy=False), mask.astype(np.int64, copy=False)


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded prompt: each row counts its own tokens from 0; pads get 1."""
    return np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)


class Engine(Protocol):
    """A pipeline kept across passes: one call of run() is one pass over the stages; `sink` chooses arrays
    for outputs (an engine may ignore it and return arrays of its own)."""

    def run(self, feed: dict[str, np.ndarray], decoding: bool = False, sink=None) -> dict[str, np.ndarray]: ...


class Decoder:
    """Prefill, then one token per row per step; returns each step's last-position logits [B, vocab].
    max_length: positions at the end of the generation, so the KV cache buffers are allocated once."""

    def __init__(self, engine: Engine, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray,
                 max_length: int | None = None):
        self.engine, self.layout, self.ids, self.mask = engine, layout, ids, mask
        self.past: dict[str, np.ndarray] = {}
        self.buffers = CacheBuffers(layout, max_length or 2 * ids.shape[1])

    def prefill(self) -> np.ndarray:
        return self._run({"input_ids": self.ids, "position_ids": prompt_positions(self.mask),
                          "attention_mask": self.mask, **self.layout.empty(self.ids.shape[0])})

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feeds tokens [B] at the next position of each row."""
        return self.extend(tokens.reshape(-1, 1))

    def extend(self, tokens: np.ndarray, every: bool = False) -> np.ndarray:
        """Feeds tokens [B, n] at the next n positions of each row in one pass; returns the last position's
        logits [B, V], or with `every` each fed position's [B, n, V] (speculative verification: the engine
        must allow it, Pipeline(every_position=True))."""
        positions = self.mask.sum(axis=1, keepdims=True) + np.arange(tokens.shape[1])  # each row's real count on
        self.mask = np.concatenate([self.mask, np.ones(tokens.shape, np.int64)], axis=1)
        return self._run({"input_ids": tokens.astype(np.int64), "position_ids": positions,
                          "attention_mask": self.mask, **self.past}, tokens.shape[1] if every else None)

    def rollback(self, drop: int) -> None:
        """Forgets the last `drop` positions of every row (rejected proposals): each cache is compacted
        inside its own memory, so no buffer is allocated and the cache stays where the plan counted it."""
        if drop <= 0:
            return
        self.mask = self.mask[:, :-drop]
        self.past = {name: cut_positions(array, self.buffers.axis[name], array.shape[self.buffers.axis[name]] - drop)
                     for name, array in self.past.items()}

    def _run(self, feed: dict[str, np.ndarray], positions: int | None = None) -> np.ndarray:
        """positions: the logits of that many last positions [B, n, V]; None: the last one's [B, V]."""
        self.past = {}  # the feed holds the only reference: the chain frees each layer's past once used
        self.buffers.begin(feed["attention_mask"].shape[1])
        wide = {"head_positions": positions} if positions not in (None, 1) else {}
        out = self.engine.run(feed, decoding=True, sink=self.buffers, **wide)
        self.past = {name: out[present] for name, present in self.layout.present_for.items()}
        return out["logits"][:, -1] if positions is None else out["logits"][:, -positions:]


def cut_positions(array: np.ndarray, axis: int, keep: int) -> np.ndarray:
    """The first `keep` positions along `axis`, moved to the front of the array's own memory (C order):
    [outer, L, inner] becomes [outer, keep, inner] in place; numpy buffers the overlapping copy."""
    shape = array.shape
    outer, length, inner = int(np.prod(shape[:axis])), shape[axis], int(np.prod(shape[axis + 1:]))
    flat = array.reshape(-1)  # a view: the cache is C-contiguous
    kept = flat[:outer * keep * inner].reshape(outer, keep, inner)
    kept[...] = flat.reshape(outer, length, inner)[:, :keep]
    return kept.reshape(*shape[:axis], keep, *shape[axis + 1:])
