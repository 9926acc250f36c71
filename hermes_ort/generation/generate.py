"""The decode loop behind hermes_ort.generate / stream, over a session its caller opened: one pipeline
serves the whole generation, its loading agents preparing the streamed stages of the next step while the
current one runs, and its exit (at the end, on error, on interrupt, or when a caller closes the stream)
joins every thread. Resident stages stay with the session for later generations.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from .decode_plan import Workload
from .decoding import CacheLayout, Decoder
from .sampling import Chooser, Sampling
from .speculative import SpeculationStats
from .speculative_stream import Speculation, speculative_tokens


def eos_ids(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.zeros(0, np.int64)
    return np.atleast_1d(np.asarray(eos_token_id, np.int64))


def sampling_of(options: dict) -> Sampling:
    try:
        return Sampling(**options)
    except TypeError:
        known = [f.name for f in dataclasses.fields(Sampling)]
        raise InputError(f"unknown generation options {sorted(set(options) - set(known))}; known: {known}") from None


def decode_tokens(session, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                  eos: np.ndarray, choice: Sampling, speculation: Speculation | None = None,
                  stats: SpeculationStats | None = None, draft=None) -> Iterator[np.ndarray]:
    """Yields every row's next token [B] step by step; `session` is a hermes InferenceSession (and `draft`
    the draft model's, when speculation has one)."""
    if speculation is not None:
        yield from speculative_tokens(session, layout, ids, mask, max_new_tokens, eos, choice, speculation,
                                      stats or SpeculationStats(), draft)
        return
    done = np.zeros(ids.shape[0], bool)
    plan = session.generation_plan(Workload(ids.shape[0], ids.shape[1], ids.shape[1] + max_new_tokens))
    with session.engine(plan) as engine:
        decoder = Decoder(engine, layout, ids, mask, ids.shape[1] + max_new_tokens)
        logits = decoder.prefill()
        choose = Chooser(choice, ids, mask, logits.shape[-1])
        for n in range(max_new_tokens):
            token = np.where(done, eos[0] if eos.size else 0, choose(logits))
            done |= np.isin(token, eos)
            yield token
            if done.all() or n == max_new_tokens - 1:
                return
            logits = decoder.step(token)
