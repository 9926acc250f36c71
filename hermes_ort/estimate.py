"""A profile estimated from weight sizes, for a model directory that `hermes profile` has not measured yet.

Deliberately pessimistic on memory (weights plus ORT's arena, prepacking doubling them) and rough on
time; `hermes profile DIR` replaces it with measurements.
"""
from __future__ import annotations

import os

from .manifest import Manifest
from .memory import rss
from .profiles import Profile, StageCost, StageProfile
from .templates import Templates

ARENA_BYTES = 32 << 20  # ORT's CPU arena and activations per session at sequence 128 (hermes profile)
LOAD_BYTES_PER_S = 1e9
RUN_BYTES_PER_S = 2e9
UNPACKED_QUANTIZED_SLOWDOWN = 20  # MatMulNBits without prepacking: SmolLM2 native head part 12 ms against 0.5


def estimate_profile(manifest: Manifest, templates: Templates) -> Profile:
    """Each stage costs the bytes its weights occupy (not whole shared files; embedding tables, which a
    run only looks up, at a tenth)."""

    def stage(s) -> StageProfile:
        form = templates.canonical[s.name]
        size = s.graph.bytes + sum(w.length // 10 if w.looked_up else w.length for w in form.weights)
        load, run = size / LOAD_BYTES_PER_S, size / RUN_BYTES_PER_S
        slowdown = UNPACKED_QUANTIZED_SLOWDOWN if form.quantized else 1
        plain = StageCost(load, load, run * slowdown, int(size * 1.1) + ARENA_BYTES)
        packed = StageCost(3 * load, 3 * load, 0.85 * run, int(size * 2.1) + ARENA_BYTES)
        return StageProfile(s.name, s.bytes, plain, packed)

    cores = os.cpu_count() or 1
    return Profile(base_bytes=rss(), transient_bytes=64 << 20, cores=cores, compute_threads=cores,
                   disk_bytes_per_s=LOAD_BYTES_PER_S, feed={}, stages=tuple(stage(s) for s in manifest.stages))
