"""A profile estimated from weight sizes and input shapes, for a model directory that `hermes profile` has
not measured yet.

Pessimistic on memory (weights plus a margin per session, prepacking doubling them) and rough on time;
`hermes profile DIR` replaces it with measurements. Tensors in flight come from the manifest's tensor
shapes at the input's axis sizes (the feed of the first run, else feeds.DEFAULT_AXES), not a constant:
a 3-layer, hidden-64 model must not be charged 64 MiB of activations.
"""
from __future__ import annotations

import os

import numpy as np

from ..engine.feeds import axis_defaults
from ..format.manifest import Manifest, TensorSpec
from ..engine.memory import rss
from .profiles import Profile, StageCost, StageProfile
from ..engine.templates import Templates

SESSION_BYTES = 4 << 20  # a stage session's own state beside its weights (ORT kernels, thread pool)
PACKED_SESSION_BYTES = 32 << 20  # prepacking adds buffers and an arena (hermes profile, GPT-2 medium: 14-20 MB)
PARKED_BYTES = 1 << 20  # a persistent quantized session between loads (SmolLM2 native block: 0.41-0.46 MiB)
STATE_BYTES = 16 << 20  # ORT's process-wide state and the running stage's activations
LOAD_BYTES_PER_S = 1e9
RUN_BYTES_PER_S = 2e9
UNPACKED_QUANTIZED_SLOWDOWN = 20  # MatMulNBits without prepacking: SmolLM2 native head part 12 ms against 0.5


def axis_sizes(manifest: Manifest, feed: dict | None) -> dict[str, int]:
    """Symbolic axis name -> size, read from the feed's shapes (else the defaults)."""
    sizes = axis_defaults()
    for spec in manifest.inputs:
        if feed is not None and spec.name in feed:
            sizes |= {d: n for d, n in zip(spec.shape, np.shape(feed[spec.name])) if isinstance(d, str)}
    return sizes


def spec_bytes(spec: TensorSpec, sizes: dict[str, int]) -> int:
    """Bytes of a tensor at these axis sizes; an axis no input names counts as the largest one known."""
    largest = max(sizes.values(), default=1)
    return int(np.prod([d if isinstance(d, int) else sizes.get(d, largest) for d in spec.shape])) * np.dtype(
        spec.dtype).itemsize


def in_flight_bytes(manifest: Manifest, sizes: dict[str, int]) -> int:
    """The most bytes alive between stages: model inputs and stage outputs until their last use."""
    last = manifest.last_use()
    live = {t.name: spec_bytes(t, sizes) for t in manifest.inputs}
    peak = sum(live.values())
    for i, stage in enumerate(manifest.stages):
        live |= {t.name: spec_bytes(t, sizes) for t in stage.outputs}
        peak = max(peak, sum(live.values()))
        live = {k: v for k, v in live.items() if last.get(k, -1) > i}
    return peak


def estimate_profile(manifest: Manifest, templates: Templates, feed: dict | None = None) -> Profile:
    """Each stage costs the bytes its weights occupy (not whole shared files; embedding tables, which a
    run only looks up, at a tenth)."""

    def stage(s) -> StageProfile:
        form = templates.canonical[s.name]
        size = s.graph.bytes + sum(w.length // 10 if w.looked_up else w.length for w in form.weights)
        load, run = size / LOAD_BYTES_PER_S, size / RUN_BYTES_PER_S
        slowdown = UNPACKED_QUANTIZED_SLOWDOWN if form.quantized else 1
        plain = StageCost(load, load, run * slowdown, int(size * 1.1) + SESSION_BYTES)
        packed = StageCost(3 * load, 3 * load, 0.85 * run, int(size * 2.1) + PACKED_SESSION_BYTES,
                           parked_bytes=PARKED_BYTES if form.quantized else 0)
        return StageProfile(s.name, s.bytes, plain, packed)

    cores = os.cpu_count() or 1
    sizes = axis_sizes(manifest, feed)
    return Profile(base_bytes=rss(), transient_bytes=in_flight_bytes(manifest, sizes) + STATE_BYTES, cores=cores,
                   compute_threads=cores, disk_bytes_per_s=LOAD_BYTES_PER_S, feed=sizes,
                   stages=tuple(stage(s) for s in manifest.stages))
