"""Decoding through streamed stages: every step's logits equal recomputing the whole sequence, tokens equal
transformers' greedy generate, left-padded batches give each row its own tokens, nothing is left running."""
import threading

import numpy as np
import pytest
import torch

import hermes_ort
from hermes_ort.engine import loading
from hermes_ort.__main__ import main as hermes
from hermes_ort.generation.decoding import CacheLayout, Decoder, check_prompt
from hermes_ort.errors import InputError
from hermes_ort.planning.planner import Plan

VOCAB = 2048


def plan_of(manifest, streamed: bool, window=2):
    names = tuple(s.name for s in manifest.stages)
    return Plan(budget=0, loaders=2, window=window, resident=() if streamed else names, prepacked=(),
                compute_threads=1, predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)


@pytest.fixture
def gpt2(exported):
    return exported("tiny-gpt2").directory


def session_of(directory, streamed=True, window=2):
    manifest = hermes_ort.InferenceSession(directory).manifest
    return hermes_ort.InferenceSession(directory, plan_override=plan_of(manifest, streamed, window))


def prompts(batch, length, seed=5):
    return np.random.default_rng(seed).integers(1, VOCAB, (batch, length))


def engine_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("loader-", "daemon"))]


def transformers_greedy(model, ids, mask, new):
    with torch.no_grad():
        return model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                              do_sample=False, pad_token_id=0).numpy()


@pytest.mark.parametrize("streamed", [False, True])
def test_every_steps_logits_equal_recomputing_without_cache(gpt2, streamed):
    ids = prompts(2, 5)
    with session_of(gpt2, streamed) as session:
        layout = CacheLayout.of(session.manifest)
        with session.engine() as engine:
            decoder = Decoder(engine, layout, *check_prompt(ids, None, 12, layout))
            logits, steps = decoder.prefill(), []
            for _ in range(12):
                steps.append(logits)
                ids = np.concatenate([ids, logits.argmax(-1)[:, None]], axis=1)
                logits = decoder.step(ids[:, -1])
        for k, got in enumerate(steps):  # the whole sequence so far, no cache
            prefix = ids[:, :5 + k]
            feed = {"input_ids": prefix, "position_ids": np.broadcast_to(np.arange(prefix.shape[1]), prefix.shape).copy(),
                    "attention_mask": np.ones_like(prefix), **layout.empty(2)}
            want = session.run(["logits"], feed)[0][:, -1]
            assert np.max(np.abs(got - want)) <= 1e-4, f"step {k}"
    assert all(len(set(row)) >= 6 for row in ids[:, 5:])  # the continuation varies: a wrong cache would show


@pytest.mark.parametrize("streamed", [False, True])
def test_greedy_generate_equals_transformers(gpt2, torch_model, streamed):
    ids = prompts(3, 6)
    want = transformers_greedy(torch_model("tiny-gpt2"), ids, np.ones_like(ids), 32)
    assert all(len(set(row)) >= 10 for row in want[:, 6:])
    with session_of(gpt2, streamed) as session:
        got = hermes_ort.generate(session, ids, max_new_tokens=32)
    assert np.array_equal(got, want)


def test_left_padded_batch_gives_each_row_its_own_tokens(gpt2, torch_model):
    rows = [prompts(1, n, seed=n)[0] for n in (3, 7, 5)]
    width = max(map(len, rows))
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    with session_of(gpt2) as session:
        batch = hermes_ort.generate(session, ids, 16, attention_mask=mask)
        alone = [hermes_ort.generate(session, row[None], 16)[0, len(row):] for row in rows]
    for r in range(3):
        assert np.array_equal(batch[r, width:], alone[r]), f"row {r}"
    assert np.array_equal(batch, transformers_greedy(torch_model("tiny-gpt2"), ids, mask, 16))


def test_each_row_stops_at_its_own_eos(gpt2):
    ids = prompts(3, 4)
    with session_of(gpt2) as session:
        free = hermes_ort.generate(session, ids, 12)[:, 4:]
        eos = int(free[1, 2])  # row 1 ends at its third token; other rows may meet it later or never
        got = hermes_ort.generate(session, ids, 12, eos_token_id=eos)[:, 4:]
    ends = []
    for r in range(3):
        hits = np.flatnonzero(free[r] == eos)
        ends.append(hits[0] + 1 if hits.size else free.shape[1])
        assert np.array_equal(got[r, :ends[-1]], free[r, :ends[-1]])
        assert (got[r, ends[-1]:] == eos).all()
    assert ends[1] == 3 and got.shape[1] == max(ends)  # decoding stops once every row has ended


def test_generate_from_a_model_directory_with_a_budget(gpt2):
    with session_of(gpt2) as session:
        want = hermes_ort.generate(session, prompts(1, 4), 8)
    assert np.array_equal(hermes_ort.generate(gpt2, prompts(1, 4), 8, memory_budget="1GiB"), want)


def test_stream_yields_a_token_per_row_per_step_and_stops_cleanly(gpt2):
    before = engine_threads()
    with session_of(gpt2) as session:
        want = hermes_ort.generate(session, prompts(2, 4), 6)[:, 4:]
        tokens = hermes_ort.stream(session, prompts(2, 4), 6)
        first = next(tokens)
        assert first.shape == (2,) and engine_threads()  # the engine lives while the stream is open
        rest = list(tokens)
        assert np.array_equal(np.stack([first, *rest], axis=1), want)
        abandoned = hermes_ort.stream(session, prompts(2, 4), 6)
        next(abandoned)
        abandoned.close()  # a caller that stops early: the engine's threads are joined
        assert engine_threads() == before
        assert np.array_equal(hermes_ort.generate(session, prompts(2, 4), 6)[:, 4:], want)  # still usable


def test_one_engine_serves_the_generation_and_wraps_to_the_next_step(gpt2, monkeypatch):
    """The loaders that prepare step n's stages keep going into step n + 1: the last stage of a step runs
    only once the first stage of the next step has loaded, and every load comes from the same threads."""
    real, cond, loads, threads = loading.prepare, threading.Condition(), [], set()
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    first, last = manifest.stages[0].name, manifest.stages[-1].name

    class LastWaitsForTheNextStep:
        def __init__(self, name, prepared):
            self.name, self.prepared = name, prepared

        def run(self, tensors):
            if self.name == last:
                step = loads.count(last)
                with cond:
                    assert cond.wait_for(lambda: loads.count(first) > step, timeout=10), "the window did not wrap"
            return self.prepared.run(tensors)

        def close(self):
            self.prepared.close()

    def prepare(directory, stage, *rest):
        prepared = LastWaitsForTheNextStep(stage.name, real(directory, stage, *rest))
        with cond:
            loads.append(stage.name)
            threads.add(threading.get_ident())
            cond.notify_all()
        return prepared

    monkeypatch.setattr(loading, "prepare", prepare)
    with session_of(gpt2, window=2) as session:
        got = hermes_ort.generate(session, prompts(1, 4), 6)
    monkeypatch.setattr(loading, "prepare", real)
    with session_of(gpt2, streamed=False) as session:
        assert np.array_equal(got, hermes_ort.generate(session, prompts(1, 4), 6))
    assert loads.count(last) == 6 and len(threads) <= 2  # a step per token, the plan's two loaders throughout


def test_interrupted_generation_leaves_nothing_running(gpt2, monkeypatch):
    real, runs = loading.prepare, []

    class InterruptOnThirdStep:
        def __init__(self, prepared):
            self.prepared = prepared

        def run(self, tensors):
            runs.append(1)
            if len(runs) == 3:
                raise KeyboardInterrupt
            return self.prepared.run(tensors)

        def close(self):
            self.prepared.close()

    monkeypatch.setattr(loading, "prepare", lambda d, stage, *rest: InterruptOnThirdStep(real(d, stage, *rest))
                        if stage.name == "block_01" else real(d, stage, *rest))
    before = threading.active_count()
    with session_of(gpt2) as session:
        with pytest.raises(KeyboardInterrupt):
            hermes_ort.generate(session, prompts(1, 4), 8)
        assert engine_threads() == [] and threading.active_count() == before
        monkeypatch.setattr(loading, "prepare", real)
        assert hermes_ort.generate(session, prompts(1, 4), 4).shape == (1, 8)  # the session still works


@pytest.mark.parametrize("change, message", [
    (dict(input_ids=np.zeros((1, 0), np.int64)), "input_ids must be integer \\[batch, sequence\\]"),
    (dict(input_ids=np.zeros(4, np.int64)), "input_ids must be integer \\[batch, sequence\\]"),
    (dict(attention_mask=np.ones((1, 3), np.int64)), "attention_mask has shape \\[1, 3\\] but input_ids has \\[1, 4\\]"),
    (dict(attention_mask=np.array([[1, 1, 1, 0]])), "row 0 of attention_mask is padded on the right"),
    (dict(max_new_tokens=125), "4 positions plus 125 new tokens exceeds the model's 128 positions"),
    (dict(input_ids=np.array([[5, 2048, 7, 9]])), "input 'input_ids' holds 2048 at \\[0, 1\\], outside the 2048 rows"),
])
def test_bad_prompts_are_refused_before_anything_loads(gpt2, change, message):
    args = dict(input_ids=np.ones((1, 4), np.int64), max_new_tokens=3, attention_mask=None) | change
    with session_of(gpt2) as session:
        with pytest.raises(InputError, match=message):
            hermes_ort.generate(session, args["input_ids"], args["max_new_tokens"],
                                attention_mask=args["attention_mask"])
        with pytest.raises(InputError, match=message):  # at the call, not at the first token
            hermes_ort.stream(session, args["input_ids"], args["max_new_tokens"],
                              attention_mask=args["attention_mask"])
    with pytest.raises(InputError, match=message):  # a directory: nothing opened
        hermes_ort.stream(gpt2, args["input_ids"], args["max_new_tokens"], attention_mask=args["attention_mask"])
    assert engine_threads() == []


def test_generate_needs_a_decoder_with_a_cache(exported):
    with hermes_ort.InferenceSession(exported("tiny-bert").directory) as session:
        with pytest.raises(InputError, match="generate needs a decoder"):
            hermes_ort.generate(session, np.array([[1, 2]]), 3)


def test_cli_generate(gpt2, capsys):
    with session_of(gpt2) as session:
        want = hermes_ort.generate(session, np.array([[1, 2, 3]]), 4)[0, 3:]
    assert hermes(["generate", str(gpt2), "--ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, want))
    assert hermes(["generate", str(gpt2), "--ids", "one,two"]) == 2


def test_a_budget_can_be_a_share_of_the_model(gpt2):
    from hermes_ort.format import manifest as manifest_io

    model_bytes = manifest_io.load(gpt2).bytes
    with hermes_ort.InferenceSession(gpt2, memory_budget="200000%") as session:  # a MiB-sized model
        assert session.budget == 2000 * model_bytes


def test_a_run_inside_an_open_stream_says_so_instead_of_hanging(gpt2):
    from hermes_ort.errors import HermesError
    from hermes_ort.engine.feeds import synthetic_feed

    with session_of(gpt2) as session:
        tokens = hermes_ort.stream(session, prompts(1, 4), 4)
        next(tokens)
        with pytest.raises(HermesError, match="already running .* close the open stream first"):
            session.run(None, synthetic_feed(session.manifest, {"sequence": 3}))
        tokens.close()
        assert session.run(["logits"], synthetic_feed(session.manifest, {"sequence": 3}))[0].shape[1] == 3


def test_a_session_plans_each_workload_once_and_does_not_count_its_own_resident_stages(gpt2, monkeypatch):
    """The process's RSS is the plan's base, but the stages this session already holds are in that RSS:
    counting them again made gpt2-medium at 25% swing between 1 and 4 resident stages from one generation to
    the next (80 <-> 228 MiB)."""
    import dataclasses

    from hermes_ort import session as session_module
    from hermes_ort.generation.decode_plan import Workload
    from hermes_ort.planning.profiles import Profile, StageCost, StageProfile

    session = hermes_ort.InferenceSession(gpt2, memory_budget="1GiB")
    work = Workload(1, 4, 12)
    first = session.generation_plan(work)
    monkeypatch.setattr(session_module, "rss", lambda: 10 * 2**30)  # whatever the process holds later
    assert session.generation_plan(work) is first  # the same generation loads the same way every time
    cost = lambda size: StageCost(0.0, 0.0, 0.0, size)
    profile = Profile(base_bytes=2**20, transient_bytes=0, cores=2, compute_threads=1, disk_bytes_per_s=1e9,
                      feed={}, stages=tuple(StageProfile(n, 0, cost(100 * 2**20), cost(300 * 2**20))
                                            for n in ("embeddings", "block_00", "block_01")))
    monkeypatch.setattr(session_module, "rss", lambda: 250 * 2**20)
    templates = session._resident.templates
    held = session_module.in_this_process(profile, templates, ("block_00", "block_01"))
    assert held.base_bytes == 50 * 2**20  # 250 MiB less the 2 x 100 MiB its resident stages take at least
    assert session_module.in_this_process(profile, templates).base_bytes == 250 * 2**20
    assert dataclasses.replace(held, base_bytes=0).stages == profile.stages
