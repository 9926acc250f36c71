"""hermes_ort.generate / hermes_ort.stream: decoding with the KV cache through streamed stages.

One pipeline serves the whole generation: its loading agents prepare the streamed stages of the next
step while the current one runs, and its exit (at the end, on error, on interrupt, or when a caller
closes the stream) joins every thread. Resident stages stay with the session for later generations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from ..format import manifest as manifest_io
from .decode_plan import Workload
from .decoding import CacheLayout, Decoder, check_prompt
from ..errors import InputError
from .sampling import Chooser, Sampling
from .speculative import SpeculationStats
from .speculative_stream import Speculation, speculative_tokens
from ..session import InferenceSession

Model = InferenceSession | str | os.PathLike


@contextlib.contextmanager
def opened(model: Model, memory_budget: int | str | None) -> Iterator[InferenceSession]:
    """The caller's session as is, or a session over a model directory, closed afterwards."""
    if isinstance(model, InferenceSession):
        yield model
        return
    with InferenceSession(model, memory_budget=memory_budget) as session:
        yield session


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


def stream(model: Model, input_ids: np.ndarray, max_new_tokens: int, *, attention_mask: np.ndarray | None = None,
           eos_token_id: int | Sequence[int] | None = None, memory_budget: int | str | None = None,
           speculate: str | os.PathLike | None = None, draft_tokens: int = 8,
           speculation_stats: SpeculationStats | None = None,
           **sampling: float | int | bool | None) -> Iterator[np.ndarray]:
    """Yields the next token of every row, [B] int64, step by step: greedy, or drawn as transformers draws
    with do_sample=True, temperature, top_k, top_p, repetition_penalty and seed (see sampling.Sampling).
    Prompts [B, S] are LEFT-padded (attention_mask 0 on pads). A row that has produced an eos id keeps
    producing it; the stream ends after max_new_tokens steps or when every row has.
    speculate: "lookup" or a draft model directory with the same vocabulary; each pass then verifies up to
    draft_tokens proposals (speculative_stream.py). speculation_stats, when given, counts tokens, passes
    and proposals accepted."""
    choice = sampling_of(sampling)  # everything is checked here, before a session or a thread exists
    speculation = Speculation(speculate, draft_tokens) if speculate is not None else None
    manifest = model.manifest if isinstance(model, InferenceSession) else manifest_io.load(model)
    layout = CacheLayout.of(manifest)
    ids, mask = check_prompt(input_ids, attention_mask, max_new_tokens, layout)
    return tokens_of(model, memory_budget, layout, ids, mask, max_new_tokens, eos_ids(eos_token_id), choice,
                     speculation, speculation_stats or SpeculationStats())


def tokens_of(model: Model, memory_budget: int | str | None, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray,
              max_new_tokens: int, eos: np.ndarray, choice: Sampling, speculation: Speculation | None = None,
              stats: SpeculationStats | None = None) -> Iterator[np.ndarray]:
    """The generator behind stream(): the session and its engine live while it is iterated."""
    if max_new_tokens == 0:
        return
    done = np.zeros(ids.shape[0], bool)
    with opened(model, memory_budget) as session:
        if speculation is not None:
            yield from speculative_tokens(session, layout, ids, mask, max_new_tokens, eos, choice, speculation,
                                          stats or SpeculationStats())
            return
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


def generate(model: Model, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
             *, attention_mask: np.ndarray | None = None, memory_budget: int | str | None = None,
             speculate: str | os.PathLike | None = None, draft_tokens: int = 8,
             speculation_stats: SpeculationStats | None = None,
             **sampling: float | int | bool | None) -> np.ndarray:
    """Prompt ids [B, S] -> [B, S + n], n <= max_new_tokens new tokens; arguments as for stream()."""
    ids = np.asarray(input_ids)
    tokens = list(stream(model, ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
                         memory_budget=memory_budget, speculate=speculate, draft_tokens=draft_tokens,
                         speculation_stats=speculation_stats, **sampling))
    return np.concatenate([ids.astype(np.int64), *[t[:, None] for t in tokens]], axis=1)
