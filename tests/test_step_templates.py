"""Generation steps run every stage they can through a template made once (Templates.form_for): a streamed
GPT-2 head part is then a mapping of its rows of the tied token table, not a session created per load.
A pass over many positions keeps its own sessions for them."""
import numpy as np
import pytest

import hermes_ort
from hermes_ort.engine import loading
from hermes_ort.engine.prepared import MappedWeights, OwnedStage, TemplateStage
from hermes_ort.engine.templates import WeightRef
from hermes_ort.format.page_cache import HUGE_PAGE
from hermes_ort.planning.planner import Plan


@pytest.fixture
def gpt2(exported):
    return exported("tiny-gpt2").directory


def session_of(directory, resident: bool) -> hermes_ort.InferenceSession:
    names = tuple(s.name for s in hermes_ort.InferenceSession(directory).manifest.stages)
    plan = Plan(budget=0, loaders=1, window=2, resident=names if resident else (), prepacked=(), compute_threads=1,
                predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)
    return hermes_ort.InferenceSession(directory, plan_override=plan)


def recorded_kinds(monkeypatch) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    original = loading.prepare

    def recording(directory, stage, *rest):
        prepared = original(directory, stage, *rest)
        kinds.setdefault(stage.name, set()).add(type(prepared).__name__)
        return prepared

    monkeypatch.setattr(loading, "prepare", recording)
    return kinds


def test_generation_streams_head_parts_through_templates_and_a_pass_gives_them_sessions(gpt2, monkeypatch):
    kinds = recorded_kinds(monkeypatch)
    ids = np.random.default_rng(3).integers(1, 2048, (2, 5))
    with session_of(gpt2, resident=False) as session:
        heads = [s.name for s in session.manifest.stages if s.kind == "head"]
        templated = {n for n, f in session._resident.templates.canonical.items() if n not in
                     session._resident.templates.forms}
        assert set(heads) <= templated  # graphs no other stage shares: not templates for a pass
        hermes_ort.generate(session, ids, max_new_tokens=4)
        assert all(kinds[h] == {"TemplateStage"} for h in heads), kinds
        kinds.clear()
        session.run(["logits"], feed_of(session, ids))
        assert all(kinds[h] == {"OwnedStage"} for h in heads), kinds


def test_a_pass_after_a_generation_replaces_resident_step_templates(gpt2):
    """A resident head part prepared for steps (its weight an input) would run a pass's many positions
    3x slower: the pass prepares it again with a session of its own."""
    ids = np.random.default_rng(4).integers(1, 2048, (1, 6))
    with session_of(gpt2, resident=True) as session:
        want = session.run(["logits"], feed_of(session, ids))[0]
    with session_of(gpt2, resident=True) as session:
        hermes_ort.generate(session, ids, max_new_tokens=3)
        heads = {i: p for i, p in session._resident.stages.items() if session.manifest.stages[i].kind == "head"}
        assert heads and all(isinstance(p, TemplateStage) and p.steps_only for p in heads.values())
        got = session.run(["logits"], feed_of(session, ids))[0]
        heads = {i: p for i, p in session._resident.stages.items() if session.manifest.stages[i].kind == "head"}
        assert heads and all(isinstance(p, OwnedStage) for p in heads.values())
    assert np.max(np.abs(got - want)) <= 1e-5


def feed_of(session, ids):
    from hermes_ort.generation.decoding import CacheLayout

    return {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
            "attention_mask": np.ones_like(ids), **CacheLayout.of(session.manifest).empty(ids.shape[0])}


def test_a_stage_maps_only_the_span_of_a_shared_file_it_reads(tmp_path):
    """A head part reads its rows of a table file other stages share: mapping the file whole populated
    took 21 ms for GPT-2 medium's quarter of wte. The span starts on a huge-page boundary (file offsets and
    addresses aligned alike, so its pages can be huge)."""
    rows, width = 1024, 1024  # 4 MiB per tensor, three of them
    table = np.arange(3 * rows * width, dtype=np.float32).reshape(3 * rows, width)
    (tmp_path / "shared.data").write_bytes(table.tobytes())
    size = rows * width * 4
    middle = WeightRef("w_0", "shared.data", size + 4096, size - 4096, "float32", (rows - 1, width))
    weights = MappedWeights(tmp_path, (middle,))
    try:
        mapped = weights.maps["shared.data"]
        assert size % HUGE_PAGE == 0 and weights.starts["shared.data"] == size  # the boundary below its offset
        assert len(mapped) == size  # to its end, not the file's
        assert np.array_equal(weights.arrays["w_0"], table[rows + 1:2 * rows])
    finally:
        weights.close()


@pytest.mark.parametrize("decode", [False, True])
def test_a_decode_profile_measures_stages_as_generation_steps_prepare_them(gpt2, tmp_path, profiled_readings,
                                                                          decode):
    import shutil

    from hermes_ort.__main__ import main as hermes

    model = tmp_path / "m"
    shutil.copytree(gpt2, model)
    decode_args = ["--decode", "--max-length", "16", "--prompt", "4"] if decode else ["--sequence", "8"]
    assert hermes(["profile", str(model), *decode_args]) == 0
    assert {decoding for _, decoding in profiled_readings} == {decode}
