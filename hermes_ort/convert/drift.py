"""How far a quantized model directory's outputs moved from its source's, on the same synthetic inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.feeds import synthetic_feed
from ..format.manifest import Manifest

SEQUENCE = 32


def drift_feed(manifest: Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """synthetic inputs with random token ids (ones would make every position alike)."""
    feed = synthetic_feed(manifest, {"sequence": SEQUENCE}, seed)
    if "input_ids" in feed:
        vocab = int(manifest.config.get("vocab_size") or 1000)
        feed["input_ids"] = np.random.default_rng(seed).integers(0, vocab, feed["input_ids"].shape)
    return feed


def compare(want: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max |got - want| over max |want|, the cosine of the flattened outputs, and for logits-like outputs
    (last axis > 1) how often the argmax agrees."""
    a, b = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    figures = {"max_rel_diff": float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)),
               "cosine": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))}
    if want.ndim >= 2 and want.shape[-1] > 1:
        figures["top1_agreement"] = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    return figures


def measure_drift(source: Path, quantized: Path) -> dict[str, dict[str, float]]:
    """Per model output (the KV cache left out): the figures of `compare`, source against quantized."""
    from ..session import InferenceSession

    with InferenceSession(source) as before, InferenceSession(quantized) as after:
        feed = drift_feed(before.manifest)
        names = [o.name for o in before.get_outputs() if not o.name.startswith("present.")]
        want, got = before.run(names, feed), after.run(names, feed)
    return {name: compare(w, g) for name, w, g in zip(names, want, got)}
