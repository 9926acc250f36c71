"""The generation plan: a one-token step's costs, the KV cache at its maximum length inside the budget."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import hermes_ort
from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning import profiles
from hermes_ort.generation.decode_plan import Workload, decode_profile_name, measured_batches, plan_generation
from hermes_ort.generation.decoding import CacheLayout
from hermes_ort.errors import BudgetError
from hermes_ort.engine.memory import format_bytes
from hermes_ort.planning.profiles import Profile, StageCost, StageProfile

MiB = 1 << 20


@pytest.fixture(scope="module")
def gpt2(exported):
    directory = exported("tiny-gpt2").directory
    return directory, manifest_io.load(directory)


def step_profile(manifest, block_mib=40, load_ms=5.0, run_ms=2.0):
    """Every stage of the manifest as a 40 MiB block whose one-token step runs shorter than its load."""
    cost = StageCost(2 * load_ms / 1e3, load_ms / 1e3, run_ms / 1e3, block_mib * MiB)
    packed = StageCost(10 * load_ms / 1e3, 8 * load_ms / 1e3, 0.8 * run_ms / 1e3, block_mib * MiB)
    stages = tuple(StageProfile(s.name, block_mib * MiB, cost, packed) for s in manifest.stages)
    return Profile(base_bytes=50 * MiB, transient_bytes=2 * MiB, cores=2, compute_threads=2, disk_bytes_per_s=1e9,
                   feed={"batch": 1, "sequence": 1, "past_sequence": 0}, stages=stages)


def test_the_kv_cache_at_its_longest_is_inside_the_predicted_peak(gpt2):
    directory, manifest = gpt2
    layout, profile = CacheLayout.of(manifest), step_profile(manifest)
    assert layout.bytes(1, 100) == 2 * 2 * 4 * 100 * 16 * 4  # layers x (key, value) x heads x positions x dim x 4
    short = plan_generation(profile, layout, manifest, Workload(1, 4, 8), 400 * MiB)
    long = plan_generation(profile, layout, manifest, Workload(1000, 4, 128), 400 * MiB)
    cache = layout.bytes(1000, 128)  # 125 MiB
    assert long.predicted_peak_bytes >= cache + profile.base_bytes and long.predicted_peak_bytes <= 0.97 * 400 * MiB
    assert len(long.resident) < len(short.resident)  # the cache took the room of resident stages


def test_a_budget_below_the_cache_states_the_minimum(gpt2):
    directory, manifest = gpt2
    layout, profile = CacheLayout.of(manifest), step_profile(manifest)
    cache = layout.bytes(2000, 128)
    with pytest.raises(BudgetError, match=f"below the smallest feasible plan, .*KV cache at its maximum length "
                                          f"{format_bytes(cache)}"):
        plan_generation(profile, layout, manifest, Workload(2000, 4, 128), 300 * MiB)


def test_short_steps_keep_stages_resident_and_leave_a_core_to_compute(gpt2):
    directory, manifest = gpt2
    layout, profile = CacheLayout.of(manifest), step_profile(manifest)
    everything = plan_generation(profile, layout, manifest, Workload(1, 4, 8), 1000 * MiB)
    assert set(everything.resident) == {s.name for s in manifest.stages}
    tight = plan_generation(profile, layout, manifest, Workload(1, 4, 8), 200 * MiB)
    assert tight.resident and len(tight.resident) < len(manifest.stages)
    assert tight.loaders == 1  # of two cores, one loads and one computes


def test_each_batch_size_plans_from_its_own_profile(gpt2, tmp_path):
    from hermes_ort.generation.decode_plan import decode_profile
    from hermes_ort.engine.templates import Templates

    directory, manifest = gpt2
    assert [decode_profile_name(b) for b in (1, 8)] == ["profile-decode.json", "profile-decode-b8.json"]
    for batch, run_ms in ((1, 1.0), (8, 3.0)):
        profiles.save(step_profile(manifest, run_ms=run_ms), tmp_path, decode_profile_name(batch))
    (tmp_path / "manifest.json").write_text((directory / "manifest.json").read_text())
    assert measured_batches(tmp_path) == [1, 8]
    templates = Templates(directory, manifest)
    run_s = lambda batch: decode_profile(tmp_path, manifest, templates, batch).stages[0].plain.run_s
    assert [run_s(b) for b in (1, 2, 8, 16)] == [0.001, 0.003, 0.003, 0.003]  # smallest batch >= asked, else largest


def test_generate_refuses_a_budget_below_its_kv_cache(gpt2):
    directory, _ = gpt2
    from hermes_ort.engine.memory import rss

    with hermes_ort.InferenceSession(directory, memory_budget=rss() + 150 * MiB) as session:  # stages fit
        prompts = np.ones((2000, 4), np.int64)
        with pytest.raises(BudgetError, match="KV cache at its maximum length"):
            hermes_ort.generate(session, prompts, 100)


def test_cli_profiles_and_plans_decoding(gpt2, tmp_path):
    import shutil

    directory = tmp_path / "m"
    shutil.copytree(gpt2[0], directory)
    hermes = [sys.executable, "-m", "hermes_ort"]
    out = subprocess.run([*hermes, "profile", str(directory), "--decode", "--max-length", "48"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    profile = profiles.load(directory, profiles.DECODE_PROFILE_NAME)
    assert profile.feed == {"batch": 1, "sequence": 1, "past_sequence": 47}
    assert profile.prefill_sequence == 32 and profile.prefill_bytes > 0  # a 32-position prefill, measured
    costs = [c for s in profile.stages for c in (s.plain, s.prepacked)]
    assert all(0 <= c.held_bytes <= c.bytes and c.held_run_s > 0 for c in costs)  # what a resident stage keeps
    assert not (directory / profiles.PROFILE_NAME).exists()  # the single-pass profile is another file
    plan = subprocess.run([*hermes, "plan", str(directory), "--decode", "--budget", "1GiB", "--batch", "4"],
                          capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "batch 4, prompt 32, up to 288 positions" in plan.stdout and "tokens/s" in plan.stdout
    low = subprocess.run([*hermes, "plan", str(directory), "--decode", "--budget", "1MiB"], capture_output=True,
                         text=True)
    assert low.returncode == 2 and "KV cache at its maximum length" in low.stderr
    bad = subprocess.run([*hermes, "profile", str(directory), "--decode", "--prompt", "0"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "argument --prompt: must be a whole number of at least 1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_measured_prefill_is_charged_and_scaled_to_the_prompt(gpt2):
    """The prefill's own memory (kernel workspaces beyond the stages, measured by hermes profile --decode)
    sits inside the predicted peak, scaled up for a longer prompt than the one measured; a profile without
    it (older files) falls back to counting activations."""
    directory, manifest = gpt2
    layout, plain = CacheLayout.of(manifest), step_profile(manifest)
    measured = dataclasses.replace(plain, prefill_bytes=30 * MiB, prefill_sequence=32)
    peak = lambda profile, prompt: plan_generation(profile, layout, manifest, Workload(1, prompt, prompt + 4),
                                                   2000 * MiB).predicted_peak_bytes
    cache = lambda prompt: layout.bytes(1, prompt + 4)
    assert peak(measured, 32) - peak(plain, 32) >= 29 * MiB
    assert (peak(measured, 64) - cache(64)) - (peak(measured, 32) - cache(32)) >= 29 * MiB  # 60 MiB at 64
    assert peak(measured, 8) - cache(8) == peak(measured, 32) - cache(32)  # never scaled down


def test_the_measured_prefill_runs_heads_on_the_last_position_as_a_decoder_does(gpt2, monkeypatch):
    """All positions through the head parts counted logits a decoder's prefill never makes (GPT-2 medium,
    8 rows of 32: 174 MiB in flight, the 25% plan infeasible)."""
    from hermes_ort.engine.feeds import synthetic_feed
    from hermes_ort.format import manifest as manifest_io
    from hermes_ort.planning import profiler

    directory = gpt2[0]
    manifest = manifest_io.load(directory)
    seen = {}
    original = profiler.prepare

    def recording(where, stage, config, templates=None, batched=False, decoding=False):
        prepared = original(where, stage, config, templates, batched, decoding)
        run = prepared.run

        def shapes_seen(tensors, into=None):
            seen[stage.name] = {t.name: tensors[t.name].shape for t in stage.inputs}
            return run(tensors)

        prepared.run = shapes_seen
        return prepared

    monkeypatch.setattr(profiler, "prepare", recording)
    profiler.prefill_bytes(directory, manifest, synthetic_feed(manifest, {"batch": 2, "sequence": 5, "past_sequence": 0}),
                           show_progress=False)
    heads = [s for s in manifest.stages if s.kind == "head"]
    assert heads and all(shape[:2] == (2, 1) for s in heads for shape in seen[s.name].values() if len(shape) == 3)
    assert seen["block_00"]["hidden.0"][:2] == (2, 5)


def test_the_measured_prefill_leaves_the_kv_cache_to_the_plan(gpt2, monkeypatch):
    """The prompt's keys and values are the KV cache, counted at its maximum length beside this: stages
    that return 8 MiB presents (untouched zeros: no RSS of their own) and small hidden states hold little."""
    import mmap

    from hermes_ort.engine.feeds import synthetic_feed
    from hermes_ort.planning import profiler

    directory = gpt2[0]
    manifest = manifest_io.load(directory)

    class Returns:
        def __init__(self, stage):
            self.stage = stage

        def run(self, tensors, into=None):  # zeros in fresh anonymous maps, whatever malloc's state (torch
            shape = lambda t: (1, 4, (2 << 20) // 4) if t.name.startswith("present.") else (1, 4, 64)  # loaded)
            untouched = lambda s: np.frombuffer(mmap.mmap(-1, 4 * int(np.prod(s))), np.float32).reshape(s)
            return {t.name: untouched(shape(t)) for t in self.stage.outputs}

        def close(self):
            pass

    monkeypatch.setattr(profiler, "prepare", lambda directory, stage, *args, **kwargs: Returns(stage))
    feed = synthetic_feed(manifest, {"batch": 1, "sequence": 4, "past_sequence": 0})
    held = profiler.prefill_bytes(directory, manifest, feed, show_progress=False)
    assert held < 1 << 20  # the presents (4 x 8 MiB by the last block) are not counted


def test_a_profile_times_streamed_runs_after_a_load_from_the_page_cache(gpt2, monkeypatch):
    """A first run after a load from disk came out 2-5x slower and scattered (GPT-2 medium decode blocks:
    7.7-22.9 ms where the engine ran them in 4-5 ms): run_s is the first run after a warm load, and the cold
    run's surplus counts in the cold load."""
    import time

    from hermes_ort.engine.feeds import synthetic_feed
    from hermes_ort.engine.sessions import SessionConfig
    from hermes_ort.engine.templates import Templates
    from hermes_ort.planning import profiler

    directory = gpt2[0]
    manifest = manifest_io.load(directory)
    stage = manifest.stage("embeddings")
    evicted, original = [], profiler.prepare
    monkeypatch.setattr(profiler, "evict", lambda where, s: evicted.append(s.name))

    class SlowFirstRun:  # the load right after an eviction: its first run pays 0.2 s more
        def __init__(self, prepared):
            self.prepared, self.slow = prepared, True

        def run(self, tensors, into=None):
            if self.slow:
                self.slow = False
                time.sleep(0.2)
            return self.prepared.run(tensors)

        def close(self):
            self.prepared.close()

    def slow_after_eviction(*args):
        prepared = original(*args)
        if evicted:
            evicted.clear()
            return SlowFirstRun(prepared)
        return prepared

    monkeypatch.setattr(profiler, "prepare", slow_after_eviction)
    feed = synthetic_feed(manifest, {"batch": 1, "sequence": 1, "past_sequence": 3})
    cost, _ = profiler.measure_stage(directory, stage, feed, SessionConfig(1, False, False), Templates(directory, manifest))
    assert cost.run_s < 0.1 and cost.held_run_s < 0.1
    assert cost.load_cold_s >= 0.2
