"""Choosing the next token from logits as transformers does: repetition penalty, temperature, top-k, top-p,
min-p (in that order), then greedy or a seeded draw. Pure numpy; no torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    """Greedy by default. temperature, top_k and top_p shape the draw only when do_sample; the repetition
    penalty (> 1 discourages tokens already in the row) applies to greedy decoding too, as in transformers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_p: float = 0.0  # 0: off; else drop tokens less likely than min_p times the most likely one

    def __post_init__(self):
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def penalize_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits [B, V]; seen [B, V] bool. Divides positive logits of seen tokens, multiplies negative ones."""
    if penalty == 1.0:
        return logits
    hit = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, hit, logits)


def keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Masks every logit below the k-th largest of its row (ties with it stay)."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def keep_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keeps the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as transformers sorts
    probs = softmax(np.take_along_axis(logits, order, axis=-1))
    drop_sorted = np.cumsum(probs, axis=-1) <= 1 - p
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


def keep_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Masks tokens whose probability is below min_p times their row's largest (the largest stays)."""
    if min_p == 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs < min_p * probs.max(axis=-1, keepdims=True), -np.inf, logits)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def filtered_logits(logits: np.ndarray, seen: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The logits after the filters, float64 for a stable softmax."""
    out = penalize_repeats(logits.astype(np.float64), seen, sampling.repetition_penalty)
    if not sampling.do_sample:
        return out
    out = out / sampling.temperature
    return keep_min_p(keep_top_p(keep_top_k(out, sampling.top_k), sampling.top_p), sampling.min_p)


class Chooser:
    """Next tokens [B] for logits [B, V], remembering each row's tokens for the repetition penalty."""

    def __init__(self, sampling: Sampling, prompt: np.ndarray, mask: np.ndarray, vocab: int):
        self.sampling, self.rng = sampling, np.random.default_rng(sampling.seed)
        self.seen = np.zeros((prompt.shape[0], vocab), bool)
        rows, cols = np.nonzero(mask)
        self.seen[rows, np.clip(prompt[rows, cols], 0, vocab - 1)] = True  # pads are not repeats

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        scores = filtered_logits(logits, self.seen, self.sampling)
        if self.sampling.do_sample:
            probs = softmax(scores)
            token = np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs], np.int64)
        else:
            token = scores.argmax(-1)
        self.seen[np.arange(token.shape[0]), token] = True
        return token
