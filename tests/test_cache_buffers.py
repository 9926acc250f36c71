"""The KV cache written into buffers kept for the generation (IO binding): the same tokens as transformers
with every stage resident, streamed through templates, and in sessions of their own; buffers rotate so a
generation holds one layer's keys and values beyond its cache; an engine that ignores the buffers still
decodes right."""
import dataclasses

import numpy as np
import pytest
import torch

import hermes_ort
from hermes_ort.engine import sessions
from hermes_ort.generation import cache_buffers
from hermes_ort.generation.decoding import CacheLayout, Decoder, check_prompt
from hermes_ort.planning.planner import Plan

NEW = 32


@pytest.fixture
def gpt2(exported):
    return exported("tiny-gpt2").directory


@pytest.fixture
def bind_every_size(monkeypatch):
    """The tiny model's tensors are far below the 1 MiB from which buffers are used: use them for all."""
    monkeypatch.setattr(cache_buffers, "LARGE_ALLOCATION", 0)
    bound = []
    original = sessions.run_session

    def counting(session, names, feed, into):
        bound.extend(into)
        return original(session, names, feed, into)

    monkeypatch.setattr(sessions, "run_session", counting)
    monkeypatch.setattr("hermes_ort.engine.prepared.run_session", counting)
    monkeypatch.setattr("hermes_ort.engine.merged.run_session", counting)
    return bound


def plan_of(manifest, resident: bool, prepacked: bool) -> Plan:
    names = tuple(s.name for s in manifest.stages)
    return Plan(budget=0, loaders=1, window=2, resident=names if resident else (),
                prepacked=names if prepacked else (), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)


@pytest.mark.parametrize("resident, prepacked", [(True, False), (True, True), (False, False), (False, True)],
                         ids=["resident", "resident-merged", "streamed-templates", "streamed-own-sessions"])
def test_tokens_equal_transformers_with_the_cache_in_kept_buffers(gpt2, torch_model, bind_every_size, resident,
                                                                    prepacked):
    ids = np.random.default_rng(5).integers(1, 2048, (3, 6))
    with torch.no_grad():
        want = torch_model("tiny-gpt2").generate(torch.from_numpy(ids), max_new_tokens=NEW, do_sample=False,
                                                 pad_token_id=0).numpy()
    manifest = hermes_ort.InferenceSession(gpt2).manifest
    with hermes_ort.InferenceSession(gpt2, plan_override=plan_of(manifest, resident, prepacked)) as session:
        got = hermes_ort.generate(session, ids, max_new_tokens=NEW)
    assert np.array_equal(got, want)
    layers = len(CacheLayout.of(manifest).past) // 2
    assert len(bind_every_size) == 2 * layers * NEW  # every present of every pass (a prefill, NEW - 1 steps)


@pytest.mark.parametrize("merged", [False, True], ids=["stage-by-stage", "merged"])
def test_buffers_rotate_one_layer_beyond_the_cache(gpt2, bind_every_size, merged):
    """Stage by stage, a generation holds its cache and one layer's spare pair; a merged run of every block
    (engine/merged.py) writes all presents while it reads all pasts: a whole spare cache (which
    decode_plan.with_merged_cache counts in the plan)."""
    ids = np.random.default_rng(1).integers(1, 2048, (2, 4))
    with hermes_ort.InferenceSession(gpt2) as session:
        layout = CacheLayout.of(session.manifest)
        plan = dataclasses.replace(session.plan, merge_resident=merged)
        assert len(plan.resident) == len(session.manifest.stages) and set(plan.prepacked) >= set(plan.resident)
        with session.engine(plan) as engine:
            decoder = Decoder(engine, layout, *check_prompt(ids, None, 8, layout), 12)
            logits = decoder.prefill()
            for _ in range(8):
                logits = decoder.step(logits.argmax(-1))
    buffers = decoder.buffers
    held = list(buffers.holding.values())
    spare = len(layout.past) if merged else 2
    assert len(held) == len(layout.past) and len(buffers.free) == spare  # 2 x layers + the spare, no more
    assert all(any(np.shares_memory(decoder.past[name], b) for b in held) for name in decoder.past)
    assert all(b.size == held[0].size for b in held + buffers.free)  # sized once, for 12 positions
    assert decoder.past[layout.past[0].name].shape[2] == 12


def test_an_engine_that_ignores_the_buffers_still_decodes_right(gpt2, bind_every_size):
    ids = np.random.default_rng(2).integers(1, 2048, (2, 5))
    with hermes_ort.InferenceSession(gpt2) as session:
        want = hermes_ort.generate(session, ids, max_new_tokens=10)
        layout = CacheLayout.of(session.manifest)
        with session.engine() as engine:
            class OwnArrays:  # as bench's whole-model engine: ORT allocates every output
                def run(self, feed, decoding=False, sink=None):
                    return engine.run(feed, decoding)

            decoder = Decoder(OwnArrays(), layout, *check_prompt(ids, None, 10, layout), 15)
            tokens, logits = [], decoder.prefill()
            for _ in range(10):
                tokens.append(logits.argmax(-1))
                logits = decoder.step(tokens[-1])
    assert np.array_equal(np.stack(tokens, axis=1), want[:, 5:])
    assert not decoder.buffers.holding and not decoder.buffers.free


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_sliding_layers_bind_buffers_of_their_window(tmp_path, bind_every_size, resident):
    """gemma3's sliding layers write presents of window - 1 positions while the global layer's grow: bound
    buffers of both sizes rotate between them, and the tokens equal decoding with no buffers at all."""
    from hermes_ort.convert import convert_gguf
    from tiny_gguf import TinyConfig, write_tiny_gguf

    write_tiny_gguf(tmp_path / "g.gguf", TinyConfig(arch="gemma3", layers=6, window=3, rope_base=1e6, head_dim=16))
    directory = convert_gguf(tmp_path / "g.gguf", tmp_path / "model", "fp32").directory
    prompt = np.array([[12, 200, 31, 260]])
    with hermes_ort.InferenceSession(directory, plan_override=plan_of(
            hermes_ort.format.manifest.load(directory), resident, False)) as session:
        got = hermes_ort.generate(session, prompt, 12)
    assert len(bind_every_size) == 2 * 6 * 12  # every present of every pass went to a kept buffer
    cache_buffers.LARGE_ALLOCATION = 1 << 62  # nothing bound: ORT's own outputs
    assert np.array_equal(got, hermes_ort.generate(directory, prompt, 12, memory_budget="1GiB"))
