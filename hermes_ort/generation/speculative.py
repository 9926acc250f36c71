"""Several tokens per pass over the streamed stages: proposals verified in one pass of the target.

When blocks stream, a step costs the bytes it streams, not its compute, so verifying k proposed tokens in one
pass costs about what one token costs, and every accepted proposal is a pass saved. Proposals come from
n-gram matches in the row's own text (`lookup`, prompt lookup decoding) or from a small draft model with the
same vocabulary kept resident. Greedy output equals plain greedy decoding always; sampling accepts a
proposal d with probability min(1, p(d) / q(d)) and otherwise draws from the residual max(0, p - q), so the
tokens follow the target's distribution (Leviathan et al. 2023). The number of proposals adapts: it doubles
while all land and falls to one past the last accepted, so a proposer that never lands costs one extra
verified position per pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import Chooser, filtered_logits, softmax


@dataclass
class SpeculationStats:
    """What the stats line reports: `tokens` in `passes` (the prefill counts), proposals made and taken."""

    tokens: int = 0
    passes: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def describe(self) -> str:
        return (f"{self.tokens} tokens in {self.passes} passes, {self.accepted} of {self.proposed} proposals "
                f"accepted ({100 * self.acceptance:.0f}%)")


class Lookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the row's last n tokens
    (n from `longest` down to 1); none when nothing matches. Deterministic: q is one-hot."""

    def __init__(self, longest: int = 3):
        self.longest = longest

    def propose(self, history: list[int], k: int) -> list[int]:
        for n in range(min(self.longest, len(history) - 1), 0, -1):
            tail = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):  # the latest match first
                if history[start:start + n] == tail:
                    return history[start + n:start + n + k]
        return []


PROBE_EVERY = 8  # plain passes in a row after which a pass verifies proposals again, to re-measure


@dataclass
class PassCosts:
    """Seconds a pass takes with one position and with several, as this generation measures them (a
    moving average): what a verify pass costs against a plain step depends on the model, the plan and
    the machine (GPT-2 medium at 25% on 2 cores: 67 ms for one position, ~120 ms for 2 to 9)."""

    one: float | None = None
    wide: float | None = None

    def record(self, width: int, seconds: float) -> None:
        old = self.one if width == 1 else self.wide
        value = seconds if old is None else 0.5 * (old + seconds)
        if width == 1:
            self.one = value
        else:
            self.wide = value


def worth_verifying(costs: PassCosts, accepted: int, proposed: int, k: int) -> bool:
    """Whether a pass verifying k proposals is expected to give more tokens per second than a plain step:
    it yields 1 + a + ... + a^k tokens (a: the acceptance so far, Laplace-smoothed) in `wide` seconds,
    a plain step one token in `one`. A cost not measured yet is measured first: a wide pass, then a
    plain step."""
    if costs.wide is None:
        return True
    if costs.one is None:
        return False
    a = (accepted + 1) / (proposed + 2)
    expected = sum(a ** i for i in range(k + 1))
    return expected / costs.wide > 1 / costs.one


def next_k(k: int, accepted: int, proposed: int, most: int) -> int:
    """Doubles while every proposal lands, else one more than were accepted (at least 1, at most `most`)."""
    return min(most, 2 * k if proposed and accepted == proposed else max(1, accepted + 1))


def judge(choose: Chooser, logits: np.ndarray, proposals: np.ndarray, q: np.ndarray | None,
          done: np.ndarray) -> tuple[list[np.ndarray], int]:
    """The tokens a verify pass emits: logits [B, k+1, V] for the last token and proposals [B, k]; q [B, k, V]
    the draft's probabilities (None: deterministic proposals). Walks the positions in order, each row's
    choice made as plain decoding makes it (its repetition history included); stops at the first position
    where any live row rejects. Returns the tokens [B] per emitted position and the proposals accepted."""
    rows, k = proposals.shape
    emitted = []
    for j in range(k + 1):
        scores = filtered_logits(logits[:, j], choose.seen, choose.sampling)
        if j == k:  # every proposal landed: the target's own next token
            token, taken = draw(choose, scores), np.ones(rows, bool)
        elif not choose.sampling.do_sample:
            token = scores.argmax(-1)
            taken = token == proposals[:, j]
        else:
            token, taken = resample(choose, softmax(scores), proposals[:, j], None if q is None else q[:, j])
        taken |= done
        choose.seen[np.arange(rows), token] = True
        emitted.append(token)
        if j == k or not taken.all():
            return emitted, j
    raise AssertionError("unreachable")


def draw(choose: Chooser, scores: np.ndarray) -> np.ndarray:
    if not choose.sampling.do_sample:
        return scores.argmax(-1)
    probs = softmax(scores)
    return np.array([choose.rng.choice(probs.shape[-1], p=row) for row in probs], np.int64)


def resample(choose: Chooser, p: np.ndarray, proposed: np.ndarray, q: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Speculative sampling per row: keep the proposal with probability min(1, p/q), else draw from the
    residual max(0, p - q) renormalized (q one-hot for a deterministic proposer: p with the proposal cut)."""
    rows = np.arange(p.shape[0])
    q = np.eye(p.shape[-1])[proposed] if q is None else q
    keep = choose.rng.random(p.shape[0]) < np.minimum(1.0, p[rows, proposed] / np.maximum(q[rows, proposed], 1e-300))
    token = proposed.copy()
    for r in np.flatnonzero(~keep):
        residual = np.maximum(p[r] - q[r], 0.0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[r]
        token[r] = choose.rng.choice(p.shape[-1], p=residual)
    return token, keep
