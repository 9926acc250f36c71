"""hermes_ort.generate / hermes_ort.stream: decoding with the KV cache through streamed stages, from a
session or a model directory (opened here, closed when the generation ends; a draft model's directory
too). The loop itself is generation/generate.py's, which needs no session class."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import numpy as np

from .format import manifest as manifest_io
from .generation.decoding import CacheLayout, check_prompt
from .generation.generate import decode_tokens, eos_ids, sampling_of
from .generation.sampling import Sampling
from .generation.speculative import SpeculationStats
from .generation.speculative_stream import Speculation, check_speculation
from .session import InferenceSession

Model = InferenceSession | str | os.PathLike


@contextlib.contextmanager
def opened(model: Model, memory_budget: int | str | None) -> Iterator[InferenceSession]:
    """The caller's session as is, or a session over a model directory, closed afterwards."""
    if isinstance(model, InferenceSession):
        yield model
        return
    with InferenceSession(model, memory_budget=memory_budget) as session:
        yield session


@contextlib.contextmanager
def drafted(speculation: Speculation | None, session: InferenceSession) -> Iterator[InferenceSession | None]:
    """The draft model's session, when speculation has one: planned inside the target's budget (the target
    then plans with the draft's share less, speculative_stream.py)."""
    if speculation is None or speculation.is_lookup:
        yield None
        return
    with InferenceSession(speculation.source, memory_budget=session.budget) as draft:
        yield draft


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
    if speculation is not None:
        check_speculation(speculation, layout, str(getattr(model, "directory", model)))
    return tokens_of(model, memory_budget, layout, ids, mask, max_new_tokens, eos_ids(eos_token_id), choice,
                     speculation, speculation_stats or SpeculationStats())


def tokens_of(model: Model, memory_budget: int | str | None, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray,
              max_new_tokens: int, eos: np.ndarray, choice: Sampling, speculation: Speculation | None,
              stats: SpeculationStats) -> Iterator[np.ndarray]:
    """The generator behind stream(): the sessions and the engine live while it is iterated."""
    if max_new_tokens == 0:
        return
    with opened(model, memory_budget) as session, drafted(speculation, session) as draft:
        yield from decode_tokens(session, layout, ids, mask, max_new_tokens, eos, choice, speculation, stats, draft)


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
