"""The batched layout (`hermes batched`): templates that read their matrices transposed give the same outputs
and tokens; only plans for several rows use it; a stale layout is not used, a corrupt file is named; resident
stages follow the plan's layout."""
import json
import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import hermes_ort
from hermes_ort.__main__ import main as hermes
from hermes_ort.engine import loading
from hermes_ort.errors import StageError
from hermes_ort.format import manifest as manifest_io
from hermes_ort.format.batched_layout import LAYOUT_DIR, load_layout
from hermes_ort.generation.decode_plan import Workload
from hermes_ort.generation.decoding import CacheLayout
from hermes_ort.graphs.transposed import rewrite, rewrite_one_row, transposable
from hermes_ort.planning.planner import Plan

NEW = 8


def streamed(batched: bool) -> Plan:
    return Plan(budget=0, loaders=1, window=2, resident=(), prepacked=(), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0, batched_layout=batched)


@pytest.fixture
def model(exported, tmp_path):
    """A copy of tiny-gpt2 with its batched layout written."""
    directory = tmp_path / "tiny"
    shutil.copytree(exported("tiny-gpt2").directory, directory)
    assert hermes(["batched", str(directory)]) == 0
    return directory


def prompts():
    ids = np.random.default_rng(3).integers(1, 2048, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = mask[2, :5] = 0  # left-padded rows of 5 and 2 tokens
    return ids, mask


def generated(directory, **options):
    ids, mask = prompts()
    with hermes_ort.InferenceSession(directory, **options) as session:
        return hermes_ort.generate(session, ids, NEW, attention_mask=mask)


def test_gemm_and_matmul_rewritten_give_the_same_outputs():
    """x W + c through Gemm, and x W for a 3-D x through MatMul, from the transposed weights."""
    rng = np.random.default_rng(0)
    w1, c, w2 = rng.standard_normal((8, 12), np.float32), rng.standard_normal(12, np.float32), rng.standard_normal(
        (12, 5), np.float32)
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["x2"]), helper.make_node("Gemm", ["x2", "w1", "c"], ["h"]),
             helper.make_node("Reshape", ["h", "back"], ["h3"]), helper.make_node("MatMul", ["h3", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
                     (("x", ["b", "s", 8]), ("w1", [8, 12]), ("c", [12]), ("w2", [12, 5]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("rows", TensorProto.INT64, [2], [-1, 8]),
                     helper.make_tensor("back", TensorProto.INT64, [3], [3, -1, 12])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    names = transposable(model.SerializeToString(), {"w1": (8, 12), "c": (12,), "w2": (12, 5)})
    assert names == ["w1", "w2"]  # a vector is not a matrix to transpose
    x = rng.standard_normal((3, 4, 8), np.float32)
    run = lambda m, feed: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = run(model.SerializeToString(), {"x": x, "w1": w1, "c": c, "w2": w2})
    transposed = {"x": x, "w1": w1.T.copy(), "c": c, "w2": w2.T.copy()}
    got = run(rewrite(model.SerializeToString(), names), transposed)
    assert got.shape == want.shape == (3, 4, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    one_row = rewrite_one_row(model.SerializeToString(), names)  # x (W^T)^T: right at any rows, fast at one
    np.testing.assert_allclose(run(one_row, transposed), want, atol=1e-5)
    np.testing.assert_allclose(run(one_row, transposed | {"x": x[:, :1]}), want[:, :1], atol=1e-5)


def test_a_weight_read_otherwise_too_is_left_as_stored():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "w"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert transposable(model.SerializeToString(), {"w": (4, 4)}) == []


def test_batched_generation_reads_the_transposed_files_and_gives_the_same_tokens(model, monkeypatch):
    mapped = []
    original = loading.MappedWeights

    def recording(directory, weights, tables=frozenset()):
        mapped.extend(w.location for w in weights)
        return original(directory, weights, tables)

    monkeypatch.setattr(loading, "MappedWeights", recording)
    want = generated(model, plan_override=streamed(False))
    assert not any(m.startswith(LAYOUT_DIR) for m in mapped)
    mapped.clear()
    got = generated(model, plan_override=streamed(True))
    np.testing.assert_array_equal(got, want)
    blocks = [s.name for s in manifest_io.load(model).stages if s.kind == "block"]
    assert {f"{LAYOUT_DIR}/{b}.data" for b in blocks} <= set(mapped)
    ids, mask = prompts()  # each row as it decodes alone, at one row (the layout unused)
    for row in range(3):
        alone = ids[row:row + 1, mask[row] == 1]
        with hermes_ort.InferenceSession(model) as session:
            np.testing.assert_array_equal(hermes_ort.generate(session, alone, NEW)[0, -NEW:], got[row, -NEW:])


def test_generation_plans_use_the_layout_where_the_model_has_one(model):
    """And one row then prepacks nothing: its one-row sessions on the layout run faster plain."""
    with hermes_ort.InferenceSession(model, memory_budget="2GiB") as session:
        one = session.generation_plan(Workload(1, 7, 7 + NEW))
        assert one.batched_layout and one.resident and not one.prepacked
        assert session.generation_plan(Workload(3, 7, 7 + NEW)).batched_layout
    shutil.rmtree(model / LAYOUT_DIR)
    with hermes_ort.InferenceSession(model, memory_budget="2GiB") as session:
        assert not session.generation_plan(Workload(3, 7, 7 + NEW)).batched_layout
        assert session.generation_plan(Workload(1, 7, 7 + NEW)).prepacked  # as stored, prepacked runs faster


def test_one_row_runs_through_its_own_session_and_gives_the_same_logits(model, monkeypatch):
    """A stage reading the layout runs one row as x (W^T)^T (MLAS's one-row kernel), more rows as
    (W^T x^T)^T: a one-row step and a 7-position prefill each take the session their rows need."""
    from hermes_ort.engine.prepared import TemplateStage

    chosen, session_for = [], TemplateStage.session_for

    def recording(self, tensors):
        picked = session_for(self, tensors)
        if self.stage.kind == "block":
            chosen.append(picked is self.one_row)
        return picked

    monkeypatch.setattr(TemplateStage, "session_for", recording)
    ids = prompts()[0][:1]
    want = generated_alone(model, ids, streamed(False))
    assert chosen and not any(chosen)  # as stored: no one-row session
    chosen.clear()
    got = generated_alone(model, ids, streamed(True))
    np.testing.assert_array_equal(got, want)
    assert chosen[:2] == [False, False] and chosen[2:] and all(chosen[2:])  # 2 blocks' prefill, then steps


def generated_alone(directory, ids, plan):
    with hermes_ort.InferenceSession(directory, plan_override=plan) as session:
        return hermes_ort.generate(session, ids, NEW)


def test_resident_template_stages_follow_the_plans_layout(model):
    """A session that decoded (reading the layout) and then ran a pass (as stored) keeps no stage prepared
    for the other layout, and back."""
    ids = prompts()[0][:1]
    feed = {"input_ids": ids, "position_ids": np.arange(7)[None], "attention_mask": np.ones_like(ids),
            **CacheLayout.of(manifest_io.load(model)).empty(1)}
    with hermes_ort.InferenceSession(model, memory_budget="2GiB") as session:
        before = session.run(["logits"], feed)[0]
        first = hermes_ort.generate(session, ids, NEW)
        assert True in {getattr(p, "batched", None) for p in session._resident.stages.values()}
        after = session.run(["logits"], feed)[0]
        assert True not in {getattr(p, "batched", None) for p in session._resident.stages.values()}
        again = hermes_ort.generate(session, ids, NEW)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_a_layout_made_from_other_weights_is_not_used(model):
    data = model / "block_01.data"
    data.write_bytes((np.fromfile(data, np.float32) * 0.5).tobytes())
    manifest = manifest_io.load(model)
    stages = tuple(s if s.name != "block_01" else type(s)(**{**s.__dict__, "weights": tuple(
        manifest_io.FileSpec.of(model, f.path) for f in s.weights)}) for s in manifest.stages)
    manifest_io.save(type(manifest)(**{**manifest.__dict__, "stages": stages}), model)
    with pytest.warns(UserWarning, match="other weight files than the model has now: not used"):
        assert load_layout(model, manifest_io.load(model)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with hermes_ort.InferenceSession(model, memory_budget="2GiB") as session:
            assert not session.generation_plan(Workload(3, 7, 7 + NEW)).batched_layout


def test_a_corrupt_layout_file_is_named_on_first_load(model):
    path = model / LAYOUT_DIR / "block_00.data"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"block_00.*batched/block_00.data does not match its sha256 in "
                                         r"batched/index.json"):
        generated(model, plan_override=streamed(True))


def test_cli_writes_and_removes_the_layout(model, capsys):
    index = json.loads((model / LAYOUT_DIR / "index.json").read_text())
    blocks = [s.name for s in manifest_io.load(model).stages if s.kind == "block"]
    assert sorted(index["stages"]) == blocks
    assert all(sum(p["transposed"] for p in v) == 4 for v in index["stages"].values())  # qkv, proj, fc, proj
    capsys.readouterr()
    assert hermes(["batched", str(model), "--remove"]) == 0
    assert not (model / LAYOUT_DIR).exists() and "removed" in capsys.readouterr().out
    assert hermes(["plan", str(model), "--decode", "--batch", "3", "--budget", "1GiB"]) == 0
    assert "batched layout" not in capsys.readouterr().out
    assert hermes(["batched", str(model)]) == 0
    assert "8 matrices of 2 stages transposed" in capsys.readouterr().out
    assert hermes(["plan", str(model), "--decode", "--batch", "3", "--budget", "1GiB"]) == 0
    assert "batched layout: template stages read their matrices transposed" in capsys.readouterr().out


@pytest.mark.parametrize("batch, reads_layout", [(1, True), (2, True), (2, False)])
def test_a_decode_profile_measures_the_batched_layout_where_there_is_one(model, profiled_readings, batch,
                                                                         reads_layout):
    if not reads_layout:
        assert hermes(["batched", str(model), "--remove"]) == 0
    assert hermes(["profile", str(model), "--decode", "--batch", str(batch), "--max-length", "16", "--prompt", "4"]) == 0
    assert {batched for batched, _ in profiled_readings} == {reads_layout}


def test_a_batched_stage_maps_its_layout_file_only(tmp_path, monkeypatch):
    """Its biases and norms are copied beside the transposed matrices: mapping the stage's own file too
    would hold its matrices twice (GPT-2 medium blocks profiled at 96 MiB instead of 48 before)."""
    from hermes_ort_export.build import export_model
    from hermes_ort.format import weights

    monkeypatch.setattr(weights, "INLINE_MAX", 64)  # biases and norms in the data files, as in a full-size model
    directory = tmp_path / "tiny"
    export_model("tiny-gpt2", directory, seed=0, progress=False, random_weights=True)
    assert hermes(["batched", str(directory)]) == 0
    blocks = {s.name: {f.path for f in s.weights} for s in manifest_io.load(directory).stages if s.kind == "block"}
    mapped = []
    original = loading.MappedWeights

    def recording(where, refs, tables=frozenset()):
        mapped.append({w.location for w in refs})
        return original(where, refs, tables)

    monkeypatch.setattr(loading, "MappedWeights", recording)
    got = generated(directory, plan_override=streamed(True))
    block_maps = [m for m in mapped if m & {f"{LAYOUT_DIR}/{b}.data" for b in blocks}]
    assert block_maps and all(m <= {f"{LAYOUT_DIR}/{b}.data" for b in blocks} for m in block_maps)
    np.testing.assert_array_equal(got, generated(directory, plan_override=streamed(False)))


def test_a_llama_family_model_decodes_the_same_tokens_through_its_layout(exported, tmp_path):
    """Llama blocks read their matrices through MatMul (FusedMatMul for one row), beside rotary inputs."""
    directory = tmp_path / "llama"
    shutil.copytree(exported("tiny-llama").directory, directory)
    ids = np.random.default_rng(8).integers(1, 500, (1, 6))
    want = generated_alone(directory, ids, streamed(False))
    assert hermes(["batched", str(directory)]) == 0
    assert load_layout(directory, manifest_io.load(directory)).stages
    np.testing.assert_array_equal(generated_alone(directory, ids, streamed(True)), want)
