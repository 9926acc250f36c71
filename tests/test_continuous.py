"""Continuous batching: rows join a running generation and leave at their own stop; every row's greedy ids
equal the same prompt decoded alone (no torch: tiny converted GGUF models)."""
from __future__ import annotations

import numpy as np
import pytest

import hermes_ort
from hermes_ort.convert import convert_gguf
from hermes_ort.generation.continuous import ContinuousBatch
from hermes_ort.generation.decoding import CacheLayout
from hermes_ort.generation.decode_plan import Workload

from tiny_gguf import TinyConfig, write_tiny_gguf

MODELS = {"llama": TinyConfig(), "gemma3-sliding": TinyConfig(arch="gemma3", layers=6, window=3, rope_base=1e6,
                                                               head_dim=16)}
# (step at which the row joins, its prompt, its new tokens): B joins while A runs; D's one-token prompt is
# shorter than even a sliding layer's kept cache (padded on the left there too); A leaves before C joins,
# and C's prompt is wider than what the batch holds then
SCHEDULE = [(0, [12, 200, 31, 260, 7], 9), (3, [5, 17, 99], 8), (4, [9], 5), (6, [40, 41, 42, 43, 44, 45, 46, 47], 6)]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_tiny_gguf(root / "m.gguf", MODELS[request.param])
    return convert_gguf(root / "m.gguf", root / "model", "fp32").directory


def solo(directory, prompt, n) -> list[int]:
    return hermes_ort.generate(directory, np.array([prompt]), n, memory_budget="1GiB")[0, len(prompt):].tolist()


def last_logits(session, ids: list[int]) -> np.ndarray:
    layout = CacheLayout.of(session.manifest)
    feed = {"input_ids": np.array([ids]), "position_ids": np.arange(len(ids))[None],
            "attention_mask": np.ones((1, len(ids)), np.int64), **layout.empty(1)}
    return session.run(["logits"], feed)[0][0, -1]


@pytest.mark.parametrize("ride", [False, True], ids=["own-prefill", "riding-the-step"])
def test_rows_that_join_and_leave_decode_as_they_would_alone(model, ride):
    with hermes_ort.InferenceSession(model, memory_budget="1GiB") as session:
        layout = CacheLayout.of(session.manifest)
        plan = session.generation_plan(Workload(4, 8, 24))
        with session.engine(plan) as engine:
            batch = ContinuousBatch(engine, layout, capacity=24)
            if ride and not batch.can_ride:
                pytest.skip("sliding-window layers: prompts are admitted through their own prefill")
            got: dict[int, list[int]] = {}
            seen: dict[int, list[np.ndarray]] = {}  # the logits each token was chosen from
            logits: dict[int, np.ndarray] = {}
            widths = []
            joining: dict[int, np.ndarray] = {}
            for t in range(20):
                for row, (start, prompt, _) in enumerate(SCHEDULE):
                    if start == t:
                        got[row], seen[row] = [], []
                        if ride:
                            joining[row] = np.array(prompt)
                        else:
                            logits[row] = batch.admit(row, np.array(prompt))
                if joining and not batch.keys:  # nothing running: the prompts make the pass alone
                    logits = batch.step({}, joining)
                    joining = {}
                for row in list(batch.keys):
                    got[row].append(int(logits[row].argmax()))
                    seen[row].append(logits[row])
                    if len(got[row]) == SCHEDULE[row][2]:
                        batch.retire(row)
                        del logits[row]
                if not batch.keys:
                    break
                widths.append(batch.width)
                logits = batch.step({row: got[row][-1] for row in batch.keys}, joining)
                joining = {}
                if not layout.kept:  # each row's positions together at the right; no column all rows skip
                    counts = batch.mask.sum(axis=1)
                    assert batch.width == counts.max(), (t, batch.width, counts)
                    assert all(batch.mask[r, batch.width - c:].all() for r, c in enumerate(counts)), t
        for row, (_, prompt, n) in enumerate(SCHEDULE):  # every step's logits: the whole sequence recomputed
            for j in range(n):
                want = last_logits(session, prompt + got[row][:j])
                np.testing.assert_allclose(seen[row][j], want, atol=1e-4 * max(1.0, np.abs(want).max()))
    for row, (_, prompt, n) in enumerate(SCHEDULE):
        assert got[row] == solo(model, prompt, n), row
    assert max(widths) < len(SCHEDULE[0][1]) + 9 + 8  # columns no row uses were cut, not kept growing


def test_a_step_feeds_every_row(model):
    with hermes_ort.InferenceSession(model, memory_budget="1GiB") as session:
        with session.engine(session.generation_plan(Workload(1, 4, 8))) as engine:
            batch = ContinuousBatch(engine, CacheLayout.of(session.manifest), capacity=8)
            batch.admit("a", np.array([1, 2, 3]))
            batch.admit("b", np.array([4, 5]))
            with pytest.raises(ValueError, match="every row"):
                batch.step({"a": 1})
            with pytest.raises(ValueError, match="already"):
                batch.admit("a", np.array([1]))


@pytest.mark.parametrize("ride", [False, True], ids=["own-prefill", "riding-the-step"])
def test_a_join_holds_no_more_than_the_two_copies_of_the_cache_the_plan_counts(model, ride):
    """The plan holds room for the batch's cache twice over (the past fed in and the presents written out);
    a join copies the cache into wider arrays, and the buffers sized for the rows before it must go then,
    not linger beside the new ones until each layer has run again (GPT-2 medium at 25% went 5% over)."""
    import tracemalloc

    long, capacity = 4200, 4210  # each layer's cache of 2 rows passes LARGE_ALLOCATION: it lives in buffers
    rng = np.random.default_rng(0)
    with hermes_ort.InferenceSession(model, memory_budget="1GiB") as session:
        layout = CacheLayout.of(session.manifest)
        if layout.kept:
            pytest.skip("sliding layers keep a window: their cache stays under LARGE_ALLOCATION")
        with session.engine(session.generation_plan(Workload(3, long, capacity))) as engine:
            batch = ContinuousBatch(engine, layout, capacity)
            tracemalloc.start()  # numpy's arrays: the cache and its buffers
            try:
                for key in ("a", "b"):
                    batch.admit(key, rng.integers(1, 200, long))
                batch.step({"a": 1, "b": 2})
                tracemalloc.reset_peak()  # from what the two rows' cache holds now
                if ride:
                    batch.step({"a": 3, "b": 4}, {"c": np.array([5, 6])})
                else:
                    batch.admit("c", np.array([5, 6]))
                    batch.step({"a": 3, "b": 4, "c": 7})
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    one_layer = layout.bytes(3, capacity) // len(layout.past) * 2  # a layer's keys and values
    assert peak <= 2 * layout.bytes(3, capacity) + one_layer, (peak, layout.bytes(3, capacity))
