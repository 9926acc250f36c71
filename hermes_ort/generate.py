"""Greedy decoding through streamed stages, with the KV cache passed between steps as plain tensors.

Works on any manifest that takes input_ids, position_ids, attention_mask and `past.<i>.key/value`
and gives logits and `present.<i>.key/value` (what `python -m export gpt2...` writes). The first step
runs the prompt with an empty past; every later step runs one token per row against the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .manifest import Manifest, TensorSpec
from .session import InferenceSession

DECODER_INPUTS = ("input_ids", "position_ids", "attention_mask")


@dataclass(frozen=True)
class CacheLayout:
    """Which model inputs are the KV cache, and the output that feeds each of them on the next step."""

    past: tuple[TensorSpec, ...]
    present_for: dict[str, str]  # past input name -> present output name

    @classmethod
    def of(cls, manifest: Manifest) -> "CacheLayout":
        names = {t.name for t in manifest.inputs}
        outputs = {t.name for t in manifest.outputs}
        past = tuple(t for t in manifest.inputs if t.name.startswith("past."))
        present_for = {t.name: "present." + t.name[len("past."):] for t in past}
        missing = [n for n in DECODER_INPUTS if n not in names] + [
            p for p in ("logits", *present_for.values()) if p not in outputs]
        if not past or missing:
            raise InputError(f"generate needs a decoder exported with its KV cache (inputs {list(DECODER_INPUTS)} "
                             f"and past.<i>.key/value, outputs logits and present.<i>.*); this model lacks "
                             f"{missing or ['past.* inputs']}")
        return cls(past, present_for)

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        """A cache of length 0: [batch, heads, 0, head_dim] per past input."""
        return {t.name: np.zeros((batch, *(d if isinstance(d, int) else 0 for d in t.shape[1:])), t.dtype)
                for t in self.past}


def step_feed(ids: np.ndarray, past: dict[str, np.ndarray], past_length: int) -> dict[str, np.ndarray]:
    """Inputs for tokens ids [B, S] that follow past_length cached positions."""
    batch, length = ids.shape
    positions = np.broadcast_to(np.arange(past_length, past_length + length, dtype=np.int64), (batch, length))
    return {"input_ids": ids, "position_ids": positions.copy(),
            "attention_mask": np.ones((batch, past_length + length), np.int64), **past}


def generate(session: InferenceSession, input_ids: np.ndarray, max_new_tokens: int,
             eos_token_id: int | None = None) -> np.ndarray:
    """Prompt ids [B, S] (int64, no padding) -> [B, S + n] with n <= max_new_tokens greedy tokens. A row
    that has produced eos_token_id keeps producing it; decoding stops when every row has."""
    layout = CacheLayout.of(session.manifest)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, sequence] with sequence > 0, got shape {list(ids.shape)}")
    names = [o.name for o in session.get_outputs()]
    past, step, done = layout.empty(ids.shape[0]), ids, np.zeros(ids.shape[0], bool)
    for _ in range(max_new_tokens):
        out = dict(zip(names, session.run(None, step_feed(step, past, ids.shape[1] - step.shape[1]))))
        token = out["logits"][:, -1].argmax(-1)  # [B]
        if eos_token_id is not None:
            token = np.where(done, eos_token_id, token)
            done |= token == eos_token_id
        ids = np.concatenate([ids, token[:, None]], axis=1)
        past = {name: out[present] for name, present in layout.present_for.items()}
        step = token[:, None]
        if eos_token_id is not None and done.all():
            break
    return ids
