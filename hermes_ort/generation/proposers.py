"""Where speculative proposals come from: n-gram lookup in each row's own text, or a small draft model.

Both keep each row's history and see every pass's outcome (`advance`), so the next proposals continue the
text as it really went on. Rows of a batch get as many proposals as the longest; a row with fewer is
padded (its padding is verified like any proposal, and its first wrong one stops the pass there).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .decoding import CacheLayout, Decoder
from .sampling import Sampling, filtered_logits, softmax
from .speculative import Lookup

PAD_PROPOSAL = 0  # any token id: a padded proposal is verified and, when it is wrong, rejected as any other


@dataclass
class Proposals:
    """k proposals per row [B, k]; q [B, k, V] the probabilities they were drawn with (None: chosen for
    certain, as lookup's are); made: the row's own proposals, its padding excluded."""

    tokens: np.ndarray
    q: np.ndarray | None
    made: np.ndarray


class Proposer(Protocol):
    def propose(self, k: int, seen: np.ndarray) -> Proposals: ...

    def advance(self, emitted: list[np.ndarray], accepted: int) -> None:
        """After a pass: the tokens it emitted per position ([B] each) and how many proposals landed."""


def histories_of(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [[int(t) for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]


def padded(rows: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), k), PAD_PROPOSAL, np.int64)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row[:k]
    return tokens, np.array([min(len(row), k) for row in rows])


class LookupProposer:
    """Prompt lookup decoding over each row's prompt and the text generated so far (no second model)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, longest: int = 3):
        self.histories, self.lookup = histories_of(ids, mask), Lookup(longest)

    def propose(self, k: int, seen: np.ndarray) -> Proposals:
        tokens, made = padded([self.lookup.propose(h, k) for h in self.histories], k)
        return Proposals(tokens, None, made)

    def advance(self, emitted: list[np.ndarray], accepted: int) -> None:
        for r, history in enumerate(self.histories):
            history.extend(int(t[r]) for t in emitted)


class DraftProposer:
    """A small model with the target's vocabulary, resident, proposing k tokens one step at a time. Its own
    KV cache follows the accepted text: after a pass it forgets its rejected proposals (rolled back in place)
    and feeds what the target emitted that it has not seen, together with its next proposals' first step."""

    def __init__(self, engine, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, capacity: int,
                 sampling: Sampling):
        self.decoder = Decoder(engine, layout, ids, mask, capacity)
        self.sampling = sampling
        self.rng = np.random.default_rng(None if sampling.seed is None else sampling.seed + 1)
        self.logits = self.decoder.prefill()
        self.pending: list[np.ndarray] = []  # emitted tokens [B] its cache lacks, in order
        self.fed = 0  # proposals of the last pass fed to its cache

    def propose(self, k: int, seen: np.ndarray) -> Proposals:
        if self.pending:
            self.logits = self.decoder.extend(np.stack(self.pending, axis=1))
            self.pending = []
        seen = seen.copy()
        tokens, qs = [], []
        for i in range(k):
            scores = filtered_logits(self.logits, seen, self.sampling)
            if self.sampling.do_sample:
                q = softmax(scores)
                token = np.array([self.rng.choice(q.shape[-1], p=row) for row in q], np.int64)
                qs.append(q)
            else:
                token = scores.argmax(-1)
            seen[np.arange(token.shape[0]), token] = True
            tokens.append(token)
            if i < k - 1:
                self.logits = self.decoder.step(token)
        self.fed = max(k - 1, 0)
        stacked = np.stack(tokens, axis=1) if tokens else np.zeros((seen.shape[0], 0), np.int64)
        return Proposals(stacked, np.stack(qs, axis=1) if qs else None, np.full(seen.shape[0], k))

    def advance(self, emitted: list[np.ndarray], accepted: int) -> None:
        kept = min(accepted, self.fed)  # its cache holds proposals 1 .. k-1; the first `accepted` stand
        self.decoder.rollback(self.fed - kept)
        self.pending.extend(emitted[kept:])
        self.fed = 0


@contextlib.contextmanager
def draft_proposer(session, ids: np.ndarray, mask: np.ndarray, capacity: int, sampling: Sampling):
    """A DraftProposer over `session` (a hermes InferenceSession), its engine open while it proposes."""
    from .decode_plan import Workload

    layout = CacheLayout.of(session.manifest)
    plan = session.generation_plan(Workload(ids.shape[0], ids.shape[1], capacity))
    with session.engine(plan) as engine:
        yield DraftProposer(engine, layout, ids, mask, capacity, sampling)

