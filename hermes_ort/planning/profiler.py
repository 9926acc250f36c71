"""hermes profile: per stage, load time (cold and warm), run time and resident bytes, under both
prepacking settings. Measured in this process, one stage at a time, from the OS's RSS."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from ..engine.chain import last_position_only
from ..engine.loading import evict, prepare, quick_to_create
from ..engine.persistent import PersistentSessions
from ..format.manifest import Manifest, StageSpec
from ..engine.memory import give_back, peak_rss, reset_peak, rss
from .profiles import Profile, StageCost, StageProfile
from ..engine.progress import progress
from ..engine.sessions import SessionConfig
from ..engine.templates import Templates


def measure_stage(directory: Path, stage: StageSpec, tensors: dict, config: SessionConfig,
                  templates: Templates, batched: bool = False, decoding: bool = False) -> tuple[StageCost, dict]:
    """bytes = the RSS the stage needs at its peak (while its session is created, prepacking holds the
    mapped and the packed weights at once) less what stays after it is destroyed (its outputs, the shared
    arena's growth: counted once for the whole model); held_bytes = the same once it has run (what a
    resident stage keeps).

    run_s is the first run after a load from the page cache: what a streamed stage pays on every pass of a
    warm model. A first run after a load from disk came out 2-5x slower and scattered (GPT-2 medium decode
    blocks: 7.7-22.9 ms, where the engine ran them in 4-5 ms); what it costs beyond the warm one is part
    of a cold load."""
    give_back()
    evict(directory, stage)
    exact_peak = reset_peak()
    start = time.perf_counter()
    prepared = prepare(directory, stage, config, templates, batched, decoding)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    outputs = prepared.run(tensors)
    cold_run = time.perf_counter() - start
    start = time.perf_counter()
    prepared.run(tensors)  # a later run, what a resident stage pays
    again = time.perf_counter() - start
    loaded, steady = peak_rss() if exact_peak else rss(), rss()
    prepared.close()
    del prepared
    give_back()
    held = rss()
    start = time.perf_counter()
    prepared = prepare(directory, stage, config, templates, batched, decoding)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    prepared.run(tensors)
    run = time.perf_counter() - start
    prepared.close()
    del prepared
    give_back()
    loaded = max(loaded, steady)  # the peak was read a moment before the RSS (a few KiB allocated between)
    return StageCost(cold + max(cold_run - run, 0), warm, run, max(loaded - held, 0), max(steady - held, 0),
                     again), outputs


def measure_persistent(directory: Path, stage: StageSpec, tensors: dict, config: SessionConfig, templates: Templates,
                       persistent: PersistentSessions, decoding: bool = False) -> tuple[StageCost, dict] | None:
    """A quantized stage through its persistent session (engine/persistent.py), as a streamed load pays it:
    loads are its pages brought back (from disk when cold), not a session; parked_bytes is what the kept
    session holds between loads, bytes what a load adds on top (the first opening's peak included: every
    stage is opened once, beside the window). None where it runs through fresh sessions instead.
    The session stays open until the profile ends, as in a run (parked_as_freed): destroyed after its
    measurement, the next session reused the heap it freed and measured too little."""
    give_back()
    persistent.files.pack(directory, stage, quick_to_create(config, stage, templates))  # once per machine
    before = rss()
    exact_peak = reset_peak()
    prepared = prepare(directory, stage, config, templates, False, decoding, persistent)
    if not getattr(prepared, "persistent", False):
        prepared.close()
        return None
    outputs = prepared.run(tensors)
    start = time.perf_counter()
    prepared.run(tensors)
    again = time.perf_counter() - start
    loaded, steady = peak_rss() if exact_peak else rss(), rss()
    prepared.close()
    if stage.name in persistent.heap_packed:  # ORT did not read the pack in place (persistent.py)
        return None
    give_back()
    parked = rss()
    held = parked - sum(v.nbytes for v in outputs.values())
    loads = []
    for cold in (True, False):
        if cold:
            evict(directory, stage)
            persistent.evict(stage)
        start = time.perf_counter()
        prepared = prepare(directory, stage, config, templates, False, decoding, persistent)
        load = time.perf_counter() - start
        start = time.perf_counter()
        prepared.run(tensors)
        loads.append((load, time.perf_counter() - start))
        prepared.close()
    give_back()
    (cold_load, cold_run), (warm_load, run) = loads
    return StageCost(cold_load + max(cold_run - run, 0), warm_load, run, max(max(loaded, steady) - parked, 0),
                     max(steady - parked, 0), again, max(held - before, 0)), outputs


def disk_bandwidth(directory: Path, manifest: Manifest) -> float:
    """Cold sequential read of the largest weight file, in bytes per second."""
    stage = max(manifest.stages, key=lambda s: s.bytes)
    evict(directory, stage)
    total, start = 0, time.perf_counter()
    buffer = bytearray(1 << 22)
    for file in stage.files:
        with open(directory / file.path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / max(time.perf_counter() - start, 1e-9)


def profile_model(directory: Path, manifest: Manifest, feed: dict[str, np.ndarray], axes: dict,
                  compute_threads: int | None = None, show_progress: bool = True, batched: bool = False,
                  decoding: bool = False) -> Profile:
    """batched: templates read the batched layout (format/batched_layout.py), as generation plans do;
    decoding: stages run through templates where a generation step's plan runs them so."""
    cores = os.cpu_count() or 1
    threads = compute_threads or cores
    give_back()
    base = rss() - sum(v.nbytes for v in feed.values())  # the feed counts as tensors in flight, not as base
    disk = disk_bandwidth(directory, manifest)
    tensors, last_use, stages, transient = dict(feed), manifest.last_use(), [], 0
    templates = Templates(directory, manifest)
    persistent = PersistentSessions.if_enabled()
    for i, stage in progress(enumerate(manifest.stages), len(manifest.stages), "profile", show_progress):
        plain, outputs = measure_stage(directory, stage, tensors, SessionConfig(threads, False, False), templates,
                                       batched, decoding)
        config = SessionConfig(threads, True, False)
        kept = measure_persistent(directory, stage, tensors, config, templates, persistent, decoding) if (
            persistent is not None and templates.canonical[stage.name].quantized) else None
        packed = kept[0] if kept else measure_stage(directory, stage, tensors, config, templates)[0]
        stages.append(StageProfile(stage.name, stage.bytes, plain, packed))
        tensors = still_needed(tensors, outputs, last_use, i)
        transient = max(transient, sum(v.nbytes for v in tensors.values()))
    if persistent is not None:
        stages = parked_as_freed(stages, persistent)
    give_back()
    held = sum(v.nbytes for v in {id(v): v for v in (*feed.values(), *tensors.values())}.values())
    state = max(rss() - base - held, 0)  # the shared arena's high-water mark, ORT's own state
    return Profile(base, transient + state, cores, threads, disk, axes, tuple(stages))


def parked_as_freed(stages: list[StageProfile], persistent: PersistentSessions) -> list[StageProfile]:
    """Closes the kept sessions; their stages' parked bytes scaled to sum to the RSS that closing gave back.
    One stage's own delta misses what the sessions hold together (each its intra-op pool thread, with its
    stack and malloc arena): SmolLM2 native's 38 kept stages measured 6.5 MiB one by one, and closing
    them all at the profile's end gave back 12.3 MiB."""
    give_back()
    before = rss()
    persistent.close()
    freed = max(before - rss(), 0)
    measured = sum(s.prepacked.parked_bytes for s in stages)
    if not measured:
        return stages
    scaled = lambda c: dataclasses.replace(c, parked_bytes=c.parked_bytes * freed // measured)
    return [dataclasses.replace(s, prepacked=scaled(s.prepacked)) if s.prepacked.parked_bytes else s for s in stages]


def still_needed(tensors: dict, outputs: dict, last_use: dict[str, int], i: int) -> dict:
    """The tensor table after stage i ran: its outputs added, what no later stage reads dropped."""
    return {k: v for k, v in {**tensors, **outputs}.items() if last_use.get(k, -1) > i}


CACHE = ("past.", "present.")  # a decoder's KV cache tensors (generation/decoding.py CacheLayout)


def prefill_bytes(directory: Path, manifest: Manifest, feed: dict[str, np.ndarray], compute_threads: int | None = None,
                  show_progress: bool = True) -> int:
    """What a prefill holds beyond the stages: the most RSS one prepacked stage's run at the prompt's shape
    takes above what it holds loaded, plus the tensors in flight between stages. A 4-bit MatMulNBits at
    accuracy level 0 dequantizes its matrix in tiles for more than one row: GPT-2 medium's 4-bit stages all
    resident peaked 37 MiB above their one-token step on a 32-token prompt, which no activation count gave.
    Heads see the last position only, as in a decoder's prefill (all 32 positions of 8 rows through GPT-2
    medium's head parts counted 174 MiB in flight), and the prompt's keys and values are not counted: they
    are the KV cache, which a generation plan counts at its maximum length (at 8 rows of 32 they were 50 of
    the 68 MiB measured, and kept GPT-2 medium's 25% plan at window 1)."""
    threads = compute_threads or os.cpu_count() or 1
    tensors, last_use, extra, in_flight = dict(feed), manifest.last_use(), 0, 0
    templates = Templates(directory, manifest)
    try:
        for i, stage in progress(enumerate(manifest.stages), len(manifest.stages), "prefill", show_progress):
            if stage.kind == "head":  # as a decoder runs its prefill: the next token's logits only
                last_position_only(tensors, stage)
            prepared = prepare(directory, stage, SessionConfig(threads, True, False), templates)
            give_back()
            before, exact_peak = rss(), reset_peak()
            outputs = prepared.run(tensors)
            extra = max(extra, (peak_rss() if exact_peak else rss()) - before)
            prepared.close()
            del prepared
            tensors = still_needed(tensors, outputs, last_use, i)
            in_flight = max(in_flight, sum(v.nbytes for k, v in tensors.items() if not k.startswith(CACHE)))
    finally:
        templates.close()
        give_back()
    return extra + in_flight
