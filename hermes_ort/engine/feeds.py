"""Synthetic inputs from the manifest, for profiling and benchmarks: symbolic axes get fixed sizes."""
from __future__ import annotations

import numpy as np

from ..format.manifest import Manifest, TensorSpec

DEFAULT_AXES = {"batch": 1, "sequence": 128, "past_sequence": 0}


def axis_defaults(sizes: dict[str, int] | None = None) -> dict[str, int]:
    """DEFAULT_AXES overridden by `sizes`, and total_sequence = sequence + past_sequence unless given."""
    sizes = {**DEFAULT_AXES, **(sizes or {})}
    sizes.setdefault("total_sequence", sizes["sequence"] + sizes["past_sequence"])
    return sizes


def axis_size(name: str, sizes: dict[str, int]) -> int:
    if name in sizes:
        return sizes[name]
    return 0 if "past" in name else 1 if "batch" in name else sizes.get("sequence", 128)


def synthetic_tensor(spec: TensorSpec, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    shape = tuple(d if isinstance(d, int) else axis_size(d, sizes) for d in spec.shape)
    if np.issubdtype(np.dtype(spec.dtype), np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    return np.ones(shape, spec.dtype)  # ids of 1 and an all-ones attention mask are valid everywhere


def synthetic_feed(manifest: Manifest, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    sizes = axis_defaults(sizes)
    rng = np.random.default_rng(seed)
    return {t.name: synthetic_tensor(t, sizes, rng) for t in manifest.inputs}
