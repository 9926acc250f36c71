"""The plan for generation: stages costed at a one-token step at the maximum context (where a 48 MB block
runs in a few ms, too short to hide its load), the KV cache at its maximum length counted inside the budget.

`hermes profile DIR --decode` measures that step (profile-decode.json); without it the step is estimated
from weight bytes, as `estimate.py` does for a single pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import profiles
from .decoding import CacheLayout
from .estimate import estimate_profile
from .manifest import Manifest
from .planner import Plan, plan
from .profiles import Profile
from .templates import Templates

STEP_BYTES_PER_S = 12e9  # a one-token step reads each weight once (a GPT-2 medium block: ~4 ms, hermes profile)
ACTIVATION_COPIES = 16  # prefill activations inside a block, in hidden states [B, S, E] (MLP 4x, q/k/v, outputs)


@dataclass(frozen=True)
class Workload:
    """What one generation holds: rows, prompt positions (padding included) and the longest row at the end."""

    batch: int
    prompt: int
    max_length: int


def decode_profile(directory: Path, manifest: Manifest, templates: Templates) -> Profile:
    """profile-decode.json when measured, else weight sizes with step times from STEP_BYTES_PER_S."""
    if (directory / profiles.DECODE_PROFILE_NAME).is_file():
        return profiles.load(directory, profiles.DECODE_PROFILE_NAME)
    estimate = estimate_profile(manifest, templates)
    step = lambda c, s: dataclasses.replace(c, run_s=s.file_bytes / STEP_BYTES_PER_S)
    stages = tuple(dataclasses.replace(s, plain=step(s.plain, s), prepacked=step(s.prepacked, s))
                   for s in estimate.stages)
    return dataclasses.replace(estimate, stages=stages, feed={"batch": 1, "sequence": 1, "past_sequence": 0})


def hidden_size(manifest: Manifest) -> int:
    """The width of the first stage's output [batch, sequence, E] (1 if it has no fixed last axis)."""
    last = manifest.stages[0].outputs[0].shape[-1]
    return last if isinstance(last, int) else 1


def in_flight_bytes(profile: Profile, layout: CacheLayout, manifest: Manifest, work: Workload) -> int:
    """Tensors beside the cache: what the profiled step held less its own cache, plus prefill activations."""
    feed = profile.feed
    profiled_cache = layout.bytes(feed.get("batch", 1), feed.get("past_sequence", 0) + feed.get("sequence", 1))
    prefill = ACTIVATION_COPIES * work.batch * work.prompt * hidden_size(manifest) * 4
    return max(profile.transient_bytes - profiled_cache, 0) + prefill


def plan_generation(profile: Profile, layout: CacheLayout, manifest: Manifest, work: Workload, budget: int,
                    cold: bool = False) -> Plan:
    """The fastest step plan that fits the budget beside the KV cache at work.max_length positions."""
    step = dataclasses.replace(profile, transient_bytes=in_flight_bytes(profile, layout, manifest, work))
    chosen = plan(step, budget, cold, kv_cache_bytes=layout.bytes(work.batch, work.max_length), first_slack=None,
                  max_loaders=max(1, profile.cores - 1))
    return dataclasses.replace(chosen, compute_threads=compute_threads(chosen, profile))


def compute_threads(chosen: Plan, profile: Profile) -> int:
    """Threads per ORT session while decoding. A one-token step is bound by memory, not arithmetic: with
    stages streaming, each loading agent keeps a core and compute gets the rest (GPT-2 medium at 25%, 2
    cores: 1 thread 4.4-4.5 tokens/s, 2 threads 3.8); with everything resident, every core computes (8.5
    against 7.9). Sessions use per-session pools with spinning off (sessions.py), so idle pools never
    spin against loaders."""
    streams = len(chosen.resident) < len(profile.stages)
    return max(1, profile.cores - chosen.loaders) if streams else profile.cores


