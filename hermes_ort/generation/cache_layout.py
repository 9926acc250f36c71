"""Which model inputs are a decoder's KV cache, how long each layer keeps it, and what it weighs: read
from the manifest alone (the buffers, the decoder and the planners all start from it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..format.manifest import Manifest, TensorSpec

DECODER_INPUTS = ("input_ids", "position_ids", "attention_mask")


@dataclass(frozen=True)
class CacheLayout:
    """Which model inputs are the KV cache, and the output that feeds each of them on the next step."""

    past: tuple[TensorSpec, ...]
    present_for: dict[str, str]  # past input name -> present output name
    max_positions: int | None  # the model's position table, when the config states it
    vocab: int | None = None  # rows of the token table (the logits' width), when fixed
    kept: dict[str, int] = field(default_factory=dict)  # past name -> the most positions its layer keeps

    def length_of(self, past: str, total: int) -> int:
        """Positions the cache of `past` holds at `total` positions: a sliding layer keeps its window's
        last window - 1 (gemma3's local layers: the manifest's config local_layers / local_window)."""
        return min(total, self.kept.get(past, total))

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
        config = manifest.config
        limits = [config.get("n_positions") or config.get("max_position_embeddings")]
        if config.get("use_sliding_window", True):  # our attention is full: beyond Mistral's window it would differ
            limits.append(config.get("sliding_window"))
        width = next(t.shape[-1] for t in manifest.outputs if t.name == "logits")
        vocab = width if isinstance(width, int) else config.get("vocab_size")  # GPT-2's head parts concatenate
        window = config.get("local_window")
        kept = {f"past.{i}.{kv}": window - 1 for i in config.get("local_layers") or () for kv in ("key", "value")
                if window}
        return cls(past, present_for, min((n for n in limits if n), default=None), vocab, kept)

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        """A cache of length 0: [batch, heads, 0, head_dim] per past input."""
        return {t.name: np.zeros((batch, *(d if isinstance(d, int) else 0 for d in t.shape[1:])), t.dtype)
                for t in self.past}

    def bytes(self, batch: int, length: int) -> int:
        """The cache at `length` positions: batch x layers x 2 x heads x length x head_dim x itemsize."""
        return sum(batch * self.length_of(t.name, length) * int(np.prod([d for d in t.shape[1:] if isinstance(d, int)]))
                   * np.dtype(t.dtype).itemsize for t in self.past)
