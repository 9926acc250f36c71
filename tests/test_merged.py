"""Consecutive resident, prepacked stages run as one ORT session (engine/merged.py): the chain's outputs,
in fewer runs, for a single pass and for decoding; which stages merge is a pure function of the plan."""
from __future__ import annotations

import numpy as np
import pytest

import hermes_ort
from hermes_ort.engine import merged, prepared, sessions
from hermes_ort.engine.merged import mergeable_runs
from hermes_ort.format.manifest import Manifest, StageSpec
from hermes_ort.planning.planner import Plan
from hermes_ort.convert import convert_gguf

from tiny_gguf import TinyConfig, write_tiny_gguf


def plan_of(names, resident=(), prepacked=None) -> Plan:
    return Plan(budget=0, loaders=1, window=2, resident=tuple(resident), prepacked=tuple(
        names if prepacked is None else prepacked), compute_threads=1, predicted_first_s=0, predicted_steady_s=0,
                predicted_peak_bytes=0)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    write_tiny_gguf(root / "tiny.gguf", TinyConfig(layers=3))
    return convert_gguf(root / "tiny.gguf", root / "model", "native", 0).directory


@pytest.fixture
def ort_runs(monkeypatch):
    """Counts session runs of every kind of prepared stage."""
    runs = []
    original = sessions.run_session

    def counting(session, names, feed, into):
        runs.append(len(names))
        return original(session, names, feed, into)

    for module in (sessions, prepared, merged):
        monkeypatch.setattr(module, "run_session", counting)
    return runs


def feed_of(session, ids: np.ndarray) -> dict:
    n = ids.shape[1]
    return {"input_ids": ids, "position_ids": np.arange(n)[None], "attention_mask": np.ones_like(ids),
            **{t.name: np.zeros((1, 2, 0, 16), np.float32) for t in session.manifest.inputs if "past" in t.name}}


def test_a_merged_pass_gives_the_chains_outputs_in_two_runs(native, ort_runs):
    ids = np.array([[5, 17, 260, 99, 3, 42]])
    manifest = hermes_ort.format.manifest.load(native)
    names = [s.name for s in manifest.stages]
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names)) as streamed:
        want = streamed.run(None, feed_of(streamed, ids))
    chained = len(ort_runs)
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names, resident=names)) as session:
        for _ in range(2):  # built once: the second pass reuses the merged sessions
            del ort_runs[:]
            got = session.run(None, feed_of(session, ids))
            assert len(ort_runs) == 2  # embeddings and blocks; the head
        assert len({id(p) for p in session._resident.stages.values()}) == 2
    assert chained == len(names)
    for w, g in zip(want, got):
        assert w.shape == g.shape and np.max(np.abs(w - g)) <= 1e-5


def test_merged_decoding_gives_the_same_tokens_as_streamed(native, ort_runs):
    ids = np.array([[12, 200, 31, 260]])
    manifest = hermes_ort.format.manifest.load(native)
    names = [s.name for s in manifest.stages]
    want = hermes_ort.generate(hermes_ort.InferenceSession(native, plan_override=plan_of(names)), ids, 8)
    del ort_runs[:]
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names, resident=names)) as session:
        got = hermes_ort.generate(session, ids, 8)
        (run,) = {id(p): p for p in session._resident.stages.values()}.values()
        assert run.spinning  # nothing streams: one pool, spinning as whole-model ORT does
    assert got.tolist() == want.tolist()
    assert len(ort_runs) == 8  # a prefill and seven steps, one run each: the head cut inside the graph


def test_a_pass_after_a_generation_gives_every_positions_logits(native, ort_runs):
    """The generation's run cuts the head's input to the last position: a later pass must not use it."""
    ids = np.array([[5, 17, 260, 99, 3, 42]])
    manifest = hermes_ort.format.manifest.load(native)
    names = [s.name for s in manifest.stages]
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names)) as streamed:
        want = streamed.run(None, feed_of(streamed, ids))
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names, resident=names)) as session:
        hermes_ort.generate(session, ids[:, :3], 2)
        got = session.run(None, feed_of(session, ids))
        step = hermes_ort.generate(session, ids, 1)
    for w, g in zip(want, got):
        assert w.shape == g.shape and np.max(np.abs(w - g)) <= 1e-5
    logits = want[[t.name for t in manifest.outputs].index("logits")]
    assert step[0, -1] == logits[0, -1].argmax()


def test_a_merged_step_run_gives_the_chains_last_position_logits(native):
    """The Slice inside the merged graph gives what run_chain.last_position_only gives outside it, at a
    prefill's many positions (1e-5)."""
    from hermes_ort.engine.chain import run_chain
    from hermes_ort.engine.merged import MergedStages
    from hermes_ort.engine.sessions import SessionConfig

    manifest = hermes_ort.format.manifest.load(native)
    with hermes_ort.InferenceSession(native, plan_override=plan_of([s.name for s in manifest.stages])) as s:
        feed = feed_of(s, np.array([[5, 17, 260, 99, 3, 42]]))
        with s.engine() as engine:
            want = engine.run(dict(feed), decoding=True)
    whole = MergedStages(native, manifest, 0, len(manifest.stages), SessionConfig(1), decoding=True)
    got = run_chain(manifest, dict(feed), lambda i: whole, decoding=True)
    assert whole.steps_only and got["logits"].shape == want["logits"].shape == (1, 1, want["logits"].shape[-1])
    for name in want:
        assert np.max(np.abs(want[name] - got[name])) <= 1e-5


def stage(name: str, kind: str) -> StageSpec:
    from hermes_ort.format.manifest import FileSpec

    return StageSpec(name=name, kind=kind, graph=FileSpec(f"{name}.onnx", 1, ""), weights=(), inputs=(), outputs=())


MODEL = Manifest(family="llama", config={}, inputs=(), outputs=(), stages=tuple(
    stage(n, k) for n, k in [("embeddings", "embeddings"), ("b0", "block"), ("b1", "block"), ("b2", "block"),
                             ("head_00", "head"), ("head_01", "head")]))
ALL = [s.name for s in MODEL.stages]


@pytest.mark.parametrize("resident, prepacked, lookups, runs", [
    (ALL, None, set(), [(0, 4), (4, 6)]),  # the head apart from the blocks
    (ALL, None, {"embeddings"}, [(1, 4), (4, 6)]),  # a lookup template keeps releasing its pages
    (["embeddings", "b0", "b2", "head_00"], None, set(), [(0, 2)]),  # b2 and head_00 are runs of one
    (ALL, ["b0", "b1", "head_00", "head_01"], set(), [(1, 3), (4, 6)]),  # unprepacked stages stay apart
    ([], None, set(), []),
])
def test_mergeable_runs(resident, prepacked, lookups, runs):
    assert mergeable_runs(MODEL, plan_of(ALL, resident, prepacked), lookups) == runs


def test_a_generation_merges_the_head_with_the_blocks_before_it():
    assert mergeable_runs(MODEL, plan_of(ALL, ALL), set(), decoding=True) == [(0, 6)]
    assert mergeable_runs(MODEL, plan_of(ALL, ["b0", "b1", "b2", "head_00"]), set(), decoding=True) == [(1, 5)]


def test_a_merged_decode_plan_counts_the_cache_twice_or_does_not_merge():
    """Merged blocks hold every past and every present during a step: the plan's peak says so, and where
    the budget has no room for it the stages run one by one."""
    import dataclasses

    from hermes_ort.format.manifest import TensorSpec
    from hermes_ort.generation.decode_plan import Workload, with_merged_cache
    from hermes_ort.generation.decoding import CacheLayout

    past = tuple(TensorSpec(f"past.{i}.{kv}", "float32", ("batch", 2, "past_sequence", 16))
                 for i in range(3) for kv in ("key", "value"))
    layout = CacheLayout(past=past, present_for={t.name: t.name.replace("past", "present") for t in past},
                         max_positions=128, vocab=300)
    work = Workload(1, 8, 64)
    cache = layout.bytes(1, 64)
    roomy = dataclasses.replace(plan_of(ALL, ALL), budget=100 * cache, predicted_peak_bytes=10 * cache)
    got = with_merged_cache(roomy, layout, MODEL, work, set())
    assert got.merge_resident and got.predicted_peak_bytes == 11 * cache  # b0..b2 are all 3 layers
    tight = dataclasses.replace(roomy, budget=int(10.5 * cache))
    assert not with_merged_cache(tight, layout, MODEL, work, set()).merge_resident
    streamed = plan_of(ALL, [])
    assert not with_merged_cache(streamed, layout, MODEL, work, set()).merge_resident
