"""stream(..., speculate=...): each pass of the target verifies the last token and k proposals at once.

The target's cache receives the last emitted token and the proposals in one pass; the positions past the
first rejected proposal are rolled back in place (Decoder.rollback), so the cache always holds exactly the
accepted text, as plain decoding would have it. A draft model is opened as its own resident session and its
weights and cache are taken out of the target's budget (the target plans with that much less).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import InputError
from ..format import manifest as manifest_io
from .cache_buffers import sequence_axis
from .decode_plan import Workload
from .decoding import CacheLayout, Decoder
from .proposers import LookupProposer, Proposer, draft_proposer
from .sampling import Chooser, Sampling
from .speculative import PROBE_EVERY, PassCosts, SpeculationStats, judge, next_k, worth_verifying

LOOKUP = "lookup"


@dataclass(frozen=True)
class Speculation:
    """speculate="lookup" (n-gram matches in the text) or a draft model directory; at most `most`
    proposals per pass."""

    source: str | os.PathLike
    most: int = 8

    def __post_init__(self):
        if self.most < 1:
            raise InputError(f"draft_tokens must be >= 1, got {self.most}")
        if str(self.source) != LOOKUP and not (Path(self.source) / manifest_io.MANIFEST_NAME).is_file():
            raise InputError(f"speculate must be 'lookup' or a model directory with a {manifest_io.MANIFEST_NAME}; "
                             f"got {str(self.source)!r}")

    @property
    def is_lookup(self) -> bool:
        return str(self.source) == LOOKUP


def check_rollback(layout: CacheLayout, model: str) -> None:
    """Rolling back needs each layer's whole cache along one positions axis."""
    if layout.kept:
        raise InputError(f"speculative decoding needs every layer to keep its whole cache; {model} has "
                         f"sliding-window layers")
    flat = [t.name for t in layout.past if sequence_axis(t.shape) is None]
    if flat:
        raise InputError(f"speculative decoding needs a named positions axis on each cache input of {model}; "
                         f"{flat[0]} has none")


def check_speculation(speculation: Speculation, layout: CacheLayout, model: str) -> None:
    """Everything speculation refuses, checked from the manifests before a session or a thread exists."""
    check_rollback(layout, model)
    if not speculation.is_lookup:
        draft = CacheLayout.of(manifest_io.load(speculation.source))
        check_draft(draft, layout, str(speculation.source))
        check_rollback(draft, str(speculation.source))


def check_draft(draft: CacheLayout, target: CacheLayout, source: str) -> None:
    if draft.vocab != target.vocab or draft.vocab is None:
        raise InputError(f"the draft model {source} has a vocabulary of {draft.vocab} tokens, the target "
                         f"{target.vocab}: speculation needs the same vocabulary")


@contextlib.contextmanager
def opened_proposer(speculation: Speculation, draft, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray,
                    capacity: int, choice: Sampling) -> Iterator[tuple[Proposer, int]]:
    """The proposer and the bytes it holds beside the target (a draft's weights and its cache); `draft` is
    the draft model's open session when speculation has one."""
    if speculation.is_lookup:
        yield LookupProposer(ids, mask), 0
        return
    source = str(speculation.source)
    draft_layout = CacheLayout.of(draft.manifest)
    check_draft(draft_layout, layout, source)
    check_rollback(draft_layout, source)
    held = draft.manifest.bytes + draft_layout.bytes(ids.shape[0], capacity)
    with draft_proposer(draft, ids, mask, capacity, choice) as proposer:
        yield proposer, held


def speculative_tokens(session, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                       eos: np.ndarray, choice: Sampling, speculation: Speculation, stats: SpeculationStats,
                       draft=None) -> Iterator[np.ndarray]:
    """Yields [B] tokens position by position, as plain decoding does, several per pass when proposals land."""
    check_rollback(layout, str(session.directory))
    batch, width = ids.shape
    capacity = width + max_new_tokens + speculation.most  # a pass feeds its proposals before it rolls back
    with opened_proposer(speculation, draft, layout, ids, mask, capacity, choice) as (proposer, held):
        work = Workload(batch, max(width, speculation.most + 1), capacity)
        plan = session.generation_plan(work, reserve=held)
        if not plan.batched_layout and len(plan.resident) < len(session.manifest.stages):
            warnings.warn(f"{session.directory} has no batched layout: a verify pass's several positions pack "
                          f"each streamed matrix on every call; `hermes batched {session.directory}` writes it",
                          stacklevel=2)
        with session.engine(plan, every_position=True) as engine:
            decoder = Decoder(engine, layout, ids, mask, capacity)
            logits = decoder.prefill()
            stats.passes += 1
            choose = Chooser(choice, ids, mask, logits.shape[-1])
            yield from verified(decoder, proposer, choose, choose(logits), max_new_tokens, eos, speculation.most,
                                stats)


def verified(decoder: Decoder, proposer: Proposer, choose: Chooser, first: np.ndarray, max_new_tokens: int,
             eos: np.ndarray, most: int, stats: SpeculationStats,
             clock: Callable[[], float] = time.perf_counter) -> Iterator[np.ndarray]:
    """The decode loop: emit, propose, verify in one pass, judge, roll the rejected positions back. A pass
    verifies proposals only while that is expected to beat a plain step (worth_verifying, from the passes
    timed here); after PROBE_EVERY plain steps it tries again."""
    done = np.zeros(first.shape[0], bool)
    fill = eos[0] if eos.size else 0
    emitted, accepted, k, count = [first], 0, 1, 0
    costs, plain_in_a_row = PassCosts(), 0
    while True:
        for token in emitted:
            token = np.where(done, fill, token)
            done |= np.isin(token, eos)
            count += 1
            stats.tokens += 1
            yield token
            if done.all() or count == max_new_tokens:
                return
        proposer.advance(emitted, accepted)
        last, ask = emitted[-1], min(k, max_new_tokens - count - 1)  # a pass emits up to ask + 1 tokens
        if ask > 0 and plain_in_a_row < PROBE_EVERY and not worth_verifying(costs, stats.accepted, stats.proposed,
                                                                            ask):
            ask = 0
        proposals = proposer.propose(ask, choose.seen) if ask > 0 else None
        start = clock()
        if proposals is None or not proposals.made[~done].any():  # nothing to verify: a plain step
            emitted, accepted = [choose(decoder.step(last))], 0
            costs.record(1, clock() - start)
            stats.passes += 1
            plain_in_a_row += 1
            continue
        logits = decoder.extend(np.concatenate([last[:, None], proposals.tokens], axis=1), every=True)
        costs.record(ask + 1, clock() - start)
        stats.passes += 1
        plain_in_a_row = 0
        emitted, accepted = judge(choose, logits, proposals.tokens, proposals.q, done)
        decoder.rollback(ask - accepted)
        stats.proposed += int(proposals.made[~done].sum())
        stats.accepted += int(np.minimum(proposals.made[~done], accepted).sum())
        k = next_k(ask, accepted, ask, most)
