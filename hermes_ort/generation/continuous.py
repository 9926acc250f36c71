"""Rows that join and leave a running generation (continuous batching): each pass over the stages computes
every active row, so every streamed block load serves every request in flight.

The batch is left-padded: each row's cache is right-aligned on a shared width T (its attention_mask marks
its real positions; position ids count each row's own tokens), which is what makes rows of different lengths
share one step. A prompt joins by riding a step's pass (step(joining=...): its whole prompt beside the
running rows' one token each, their extra positions masked, so an arrival costs no extra weight stream), or,
with sliding-window layers whose windows count columns, through a prefill pass of its own (admit()) merged in
after: the narrower side padded on the left with masked zeros. A row that
leaves is dropped from every tensor between passes, and columns that no row uses any more are cut off the
left, so T follows the longest row still running. A sliding layer's cache (CacheLayout.kept) is
right-aligned too and is cut to its own length the same way.
"""
from __future__ import annotations

from typing import Hashable

import numpy as np

from .cache_buffers import CacheBuffers
from .decoding import CacheLayout, Engine, prompt_positions


class ContinuousBatch:
    """admit(key, prompt) -> the prompt's last logits; step({key: token}) -> {key: logits}; retire(key)."""

    def __init__(self, engine: Engine, layout: CacheLayout, capacity: int):
        self.engine, self.layout = engine, layout
        self.keys: list[Hashable] = []  # row handles, in batch order
        self.mask = np.zeros((0, 0), np.int64)  # [B, T]
        self.past: dict[str, np.ndarray] = {}
        self.buffers = CacheBuffers(layout, capacity)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def admit(self, key: Hashable, prompt: np.ndarray) -> np.ndarray:
        """Prefills the prompt ids [S] in a pass of its own and adds the row; returns its last logits [V]."""
        if key in self.keys:
            raise ValueError(f"row {key!r} is already in the batch")
        ids = np.asarray(prompt, np.int64).reshape(1, -1)
        mask = np.ones_like(ids)
        out = self.engine.run({"input_ids": ids, "position_ids": prompt_positions(mask), "attention_mask": mask,
                               **self.layout.empty(1)}, decoding=True)  # ORT's own outputs: the buffers hold the batch
        past = {name: out[present] for name, present in self.layout.present_for.items()}
        self._merge(key, mask, past)
        return out["logits"][0, -1]

    @property
    def can_ride(self) -> bool:
        """Prompts may join a step's pass: not with sliding layers, whose window counts columns."""
        return not self.layout.kept

    def step(self, tokens: dict[Hashable, int], joining: dict[Hashable, np.ndarray] | None = None
             ) -> dict[Hashable, np.ndarray]:
        """One pass: each row feeds its next token, or the next chunk of its prompt (ids [n]; every row of
        the batch must be given one), and each joining prompt (or its first chunk) rides the same pass (a
        row's new positions before its own are masked), so an arrival costs no pass of its own. Returns
        every row's last logits."""
        joining = dict(joining or {})
        if set(tokens) != set(self.keys):
            raise ValueError(f"a step feeds every row of the batch: {sorted(map(str, self.keys))}")
        if joining and not self.can_ride:
            raise ValueError("prompts cannot ride a step with sliding-window layers: admit() them")
        if any(key in self.keys for key in joining):
            raise ValueError("a joining row is already in the batch")
        prompts = [np.asarray(p, np.int64).ravel() for p in joining.values()]
        width = max([1] + [p.size for p in prompts] + [np.size(t) for t in tokens.values()])
        rows = len(self.keys) + len(prompts)
        ids, new_mask = np.zeros((rows, width), np.int64), np.zeros((rows, width), np.int64)
        positions = np.ones((rows, width), np.int64)
        for r, key in enumerate(self.keys):  # one token, or a further chunk of a prompt being prefilled
            fed = np.atleast_1d(np.asarray(tokens[key], np.int64))
            ids[r, width - fed.size:], new_mask[r, width - fed.size:] = fed, 1
            positions[r, width - fed.size:] = self.mask[r].sum() + np.arange(fed.size)
        for j, prompt in enumerate(prompts):
            r = len(self.keys) + j
            ids[r, width - prompt.size:], new_mask[r, width - prompt.size:] = prompt, 1
            positions[r, width - prompt.size:] = np.arange(prompt.size)
        if prompts:
            self.mask = np.concatenate([self.mask, np.zeros((len(prompts), self.width), np.int64)])
            self.past = {name: np.concatenate([array, np.zeros((len(prompts), *array.shape[1:]), array.dtype)])
                         for name, array in self.past.items()} if self.keys else self.layout.empty(len(prompts))
            self.keys = self.keys + list(joining)
            self.buffers.forget()
        self.mask = np.concatenate([self.mask, new_mask], axis=1)
        feed = {"input_ids": ids, "position_ids": positions, "attention_mask": self.mask, **self.past}
        self.past = {}  # the feed holds the only reference: the chain frees each layer's past once used
        self.buffers.begin(self.width)
        out = self.engine.run(feed, decoding=True, sink=self.buffers)
        self.past = {name: out[present] for name, present in self.layout.present_for.items()}
        if width > 1:
            self._compact()
        return dict(zip(self.keys, out["logits"][:, -1]))

    def _compact(self) -> None:
        """Moves each row's positions together at the right end and drops the columns no row needs then.
        A pass of w positions (a riding prompt, a prompt's chunk) adds w columns to every row, masked for
        the rows that fed less: left there, they would pile up join after join and the cache would outgrow
        the rows' reservations (prompt + max_tokens each). One copy of the cache, as a join's merge makes."""
        if self.layout.kept or not self.keys:  # sliding layers keep a window of columns, not positions
            return
        counts = self.mask.sum(axis=1)
        width = int(counts.max())
        packed = np.arange(width) >= width - counts[:, None]  # [B, width]: each row's positions at the right
        if width == self.width and np.array_equal(self.mask.astype(bool), packed):
            return
        rows = [np.flatnonzero(row) for row in self.mask]
        past = {}
        for name in list(self.past):
            array, axis = self.past.pop(name), self.layout_axis(name)  # the old one goes as the new one fills
            shape = list(array.shape)
            shape[axis] = width
            moved = np.zeros(shape, array.dtype)
            for r, columns in enumerate(rows):
                place = [r] + [slice(None)] * (axis - 1) + [slice(width - columns.size, width)]
                moved[tuple(place)] = np.take(array[r], columns, axis=axis - 1)
            past[name] = moved
        self.past, self.mask = past, packed.astype(np.int64)
        self.buffers.forget()

    def retire(self, key: Hashable) -> None:
        """Drops the row (between passes) and the columns no row uses any more."""
        keep = [k for k, other in enumerate(self.keys) if other != key]
        self.keys = [self.keys[k] for k in keep]
        self.mask = self.mask[keep]
        self.past = {name: array[keep] for name, array in self.past.items()}
        used = np.flatnonzero(self.mask.any(axis=0))
        start = int(used[0]) if used.size else self.width
        if start:
            self.mask = self.mask[:, start:]
            self.past = {name: np.ascontiguousarray(self._last(name, array, self.width))
                         for name, array in self.past.items()}

    def _merge(self, key: Hashable, mask: np.ndarray, past: dict[str, np.ndarray]) -> None:
        if not self.keys:
            self.keys, self.mask, self.past = [key], mask, past
            return
        width = max(self.width, mask.shape[1])
        self.mask = np.concatenate([left_pad(self.mask, width, 1), left_pad(mask, width, 1)])
        self.past = {name: np.concatenate([self._padded(name, self.past[name], width),
                                           self._padded(name, past[name], width)])
                     for name in self.past}
        self.buffers.forget()
        self.keys.append(key)

    def _padded(self, name: str, array: np.ndarray, width: int) -> np.ndarray:
        return left_pad(array, self.layout.length_of(name, width), self.layout_axis(name))

    def _last(self, name: str, array: np.ndarray, width: int) -> np.ndarray:
        axis, length = self.layout_axis(name), self.layout.length_of(name, width)
        return np.take(array, np.arange(array.shape[axis] - length, array.shape[axis]), axis=axis)

    def layout_axis(self, name: str) -> int:
        return self.buffers.axis[name]


def left_pad(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    """Zeros before the array's entries along `axis` up to `length` (masked positions)."""
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, array.dtype), array], axis=axis)
