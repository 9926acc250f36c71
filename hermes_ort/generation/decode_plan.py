"""The plan for generation: stages costed at a one-token step at the maximum context (where a 48 MB block
runs in a few ms, too short to hide its load), the KV cache at its maximum length counted inside the budget.

`hermes profile DIR --decode` measures that step (profile-decode.json); without it the step is estimated
from weight bytes, as `estimate.py` does for a single pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..planning import profiles
from .decoding import CacheLayout
from ..planning.estimate import UNPACKED_QUANTIZED_SLOWDOWN, estimate_profile
from ..format.manifest import Manifest
from ..planning.planner import Plan, Rules, plan, usable
from ..engine.merged import mergeable_runs
from ..planning.profiles import Profile
from ..engine.templates import Templates

STEP_BYTES_PER_S = 12e9  # a one-token step reads each weight once (a GPT-2 medium block: ~4 ms, hermes profile)
STEP_IN_FLIGHT = 16 << 20  # a one-token step's tensors beside the logits (measured: 14.8 MiB, SmolLM2 hermes profile --decode)
ACTIVATION_COPIES = 16  # prefill activations inside a block, in hidden states [B, S, E] (MLP 4x, q/k/v, outputs)


@dataclass(frozen=True)
class Workload:
    """What one generation holds: rows, prompt positions (padding included) and the longest row at the end."""

    batch: int
    prompt: int
    max_length: int


def decode_profile_name(batch: int) -> str:
    """profile-decode.json for one row, profile-decode-b8.json for eight: a wider step packs weights and
    holds activations a one-row step does not, so each batch size is measured on its own."""
    return profiles.DECODE_PROFILE_NAME if batch == 1 else profiles.DECODE_PROFILE_NAME.replace(
        ".json", f"-b{batch}.json")


def measured_batches(directory: Path) -> list[int]:
    found = [1] if (directory / profiles.DECODE_PROFILE_NAME).is_file() else []
    stem = profiles.DECODE_PROFILE_NAME.replace(".json", "-b")
    return sorted(found + [int(p.name[len(stem):-5]) for p in directory.glob(stem + "*.json")
                           if p.name[len(stem):-5].isdigit()])


def decode_profile(directory: Path, manifest: Manifest, templates: Templates, batch: int = 1) -> Profile:
    """The decode profile measured at the smallest batch >= `batch` (else the largest measured); without
    one, weight sizes with step times from STEP_BYTES_PER_S."""
    batches = measured_batches(directory)
    if batches:
        chosen = next((b for b in batches if b >= batch), batches[-1])
        return profiles.load(directory, decode_profile_name(chosen))
    estimate = estimate_profile(manifest, templates)
    step = lambda c, s, slowdown=1: dataclasses.replace(c, run_s=s.file_bytes / STEP_BYTES_PER_S * slowdown)
    slowdown = lambda s: UNPACKED_QUANTIZED_SLOWDOWN if templates.canonical[s.name].quantized else 1
    stages = tuple(dataclasses.replace(s, plain=step(s.plain, s, slowdown(s)), prepacked=step(s.prepacked, s))
                   for s in estimate.stages)
    return dataclasses.replace(estimate, stages=stages, feed={"batch": 1, "sequence": 1, "past_sequence": 0},
                               transient_bytes=STEP_IN_FLIGHT + 2 * batch * vocab_size(manifest) * 4)


def vocab_size(manifest: Manifest) -> int:
    logits = next((t for t in manifest.outputs if t.name == "logits"), None)
    last = logits.shape[-1] if logits is not None else 1
    return last if isinstance(last, int) else 1


def hidden_size(manifest: Manifest) -> int:
    """The width of the first stage's output [batch, sequence, E] (1 if it has no fixed last axis)."""
    last = manifest.stages[0].outputs[0].shape[-1]
    return last if isinstance(last, int) else 1


def in_flight_bytes(profile: Profile, layout: CacheLayout, manifest: Manifest, work: Workload) -> int:
    """Tensors beside the cache: what the profiled step held less its own cache, plus the prefill's own:
    measured by `hermes profile --decode` (scaled up for a longer prompt), else counted as activations."""
    feed = profile.feed
    profiled_cache = layout.bytes(feed.get("batch", 1), feed.get("past_sequence", 0) + feed.get("sequence", 1))
    prefill = ACTIVATION_COPIES * work.batch * work.prompt * hidden_size(manifest) * 4
    if profile.prefill_sequence:
        prefill = max(prefill, int(profile.prefill_bytes * max(1.0, work.prompt / profile.prefill_sequence)))
    return max(profile.transient_bytes - profiled_cache, 0) + prefill


def plan_generation(profile: Profile, layout: CacheLayout, manifest: Manifest, work: Workload, budget: int,
                    cold: bool = False, transposed: bool = False) -> Plan:
    """The fastest step plan that fits the budget beside the KV cache at work.max_length positions.
    transposed: the model has the transposed layout (`hermes batched`; has_transposed_layout), which the
    plan's template stages then read; one row reads it faster unprepacked (graphs/transposed.py), so a
    one-row plan prepacks nothing (GPT-2 medium at 100%, one row, in rounds with the prepacked plan: 96.7 /
    97.5 / 117.2 against 107.4 / 102.7 / 109.7 ms a step; and no prepacking's 63 MiB peak per block
    created, nor its time before the first token).

    Loading agents leave a core to compute, and since a one-token step is too short to hide a load, loads
    are charged as taking their CPU from compute (planner.CONTENDED_LOAD), and the window keeps room for
    the next stage (window 1 at 25%: 2.8 tokens/s against 3.8 with window 2). Every session keeps its own
    intra-op pool of all cores with spinning off (sessions.py). Measured on 2 cores, GPT-2 medium, prompt 32 + 16 tokens, fixed plans run
    through InferenceSession.engine() with bench.generate's decode loop: ORT's global pool with
    spinning was 10-14% faster with every stage resident (11.1 against 9.7 tokens/s) but starved the
    loaders when stages stream (25% budget: 3.1 against 4.4 tokens/s), and it is fixed per process at the
    first session, so it cannot follow the plan; per-session pools with spinning on fell to 1.2 tokens/s
    (29 pools spinning against each other)."""
    step = dataclasses.replace(profile, transient_bytes=in_flight_bytes(profile, layout, manifest, work))
    one_row = transposed and work.batch == 1
    rules = Rules(first_slack=None, max_loaders=max(1, profile.cores - 1), contended=True, min_window=2,
                  prepack_resident=not one_row, prepack=not one_row)
    chosen = plan(step, budget, cold, kv_cache_bytes=layout.bytes(work.batch, work.max_length), rules=rules)
    return dataclasses.replace(chosen, batched_layout=True) if transposed else chosen


def with_merged_cache(chosen: Plan, layout: CacheLayout, manifest: Manifest, work: Workload,
                      lookups: set[str]) -> Plan:
    """A merged run of blocks (engine/merged.py) writes every present of its layers while it still reads
    every past: their cache is held twice during the step, where stage by stage one layer's is. Merge
    when that fits the budget (counted in the plan's peak), else run the stages one by one."""
    runs = mergeable_runs(manifest, chosen, lookups, decoding=True)
    merged = sum(manifest.stages[i].kind != "head" for start, stop in runs for i in range(start, stop))
    layers = max(len(layout.past) // 2, 1)
    extra = layout.bytes(work.batch, work.max_length) * min(merged, layers) // layers
    if not runs or chosen.predicted_peak_bytes + extra > usable(chosen.budget):
        return dataclasses.replace(chosen, merge_resident=False)
    return dataclasses.replace(chosen, predicted_peak_bytes=chosen.predicted_peak_bytes + extra)


def has_transposed_layout(templates: Templates) -> bool:
    """Whether template stages can read their matrices transposed (`hermes batched`; graphs/transposed.py),
    through one session for several rows and another for one: 8 rows of a GPT-2 medium block at 48
    positions ran 15.1 ms with its matrices as stored and 7.0 ms transposed; one row 2.95-3.79 ms against
    3.48-4.53 as stored and 3.26-4.13 prepacked."""
    layout = templates.batched()
    return layout is not None and bool(layout.stages)
