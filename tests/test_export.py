import json

import numpy as np
import pytest
import torch

import hermes_ort
from export import bert, gpt2, vit
from export.configs import NAMED
from export.families import FAMILIES
from hermes_ort.errors import HermesError

from conftest import TINY


def outputs(session, feed):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def test_every_family_has_a_tiny_config():
    tiny_families = {NAMED[name][0] for name in TINY}
    assert tiny_families == set(FAMILIES)


@pytest.mark.parametrize("name", TINY)
def test_export_publishes_a_verified_directory(exported, name):
    result = exported(name)
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["extra"]["max_abs_diff"] <= 1e-4
    kinds = [s["kind"] for s in manifest["stages"]]
    assert kinds[:3] == ["embeddings", "block", "block"] and set(kinds[3:]) == {"head"}
    assert not list(result.directory.parent.glob(f".{name}.partial-*"))


def test_gpt2_chain_equals_torch(exported, torch_model):
    model, session = torch_model("tiny-gpt2"), hermes_ort.InferenceSession(exported("tiny-gpt2").directory)
    ids = np.random.default_rng(1).integers(0, 1000, (2, 9))
    want = model(input_ids=torch.from_numpy(ids)).logits.detach().numpy()
    got = outputs(session, gpt2.step_feed(ids, gpt2.empty_past(model.config, 2), 0))["logits"]
    assert np.max(np.abs(got - want)) <= 1e-4


def test_gpt2_with_past_equals_without_past(exported, torch_model):
    config = torch_model("tiny-gpt2").config
    session = hermes_ort.InferenceSession(exported("tiny-gpt2").directory)
    ids = np.random.default_rng(2).integers(0, 1000, (1, 12))
    whole = outputs(session, gpt2.step_feed(ids, gpt2.empty_past(config, 1), 0))
    past = gpt2.empty_past(config, 1)
    for start in range(0, 12, 4):  # three steps of four tokens, each reading the last step's presents
        step = outputs(session, gpt2.step_feed(ids[:, start:start + 4], past, start))
        assert np.max(np.abs(step["logits"] - whole["logits"][:, start:start + 4])) <= 1e-4
        past = gpt2.presents_as_past(step, config.n_layer)
    assert np.max(np.abs(past["past.1.value"] - whole["present.1.value"])) <= 1e-5


def test_gpt2_tied_head_is_stored_once_in_block_sized_parts(exported):
    manifest = hermes_ort.InferenceSession(exported("tiny-gpt2").directory).manifest
    heads = [s for s in manifest.stages if s.kind == "head"]
    assert len(heads) == 3 and all([w.path for w in s.weights] == ["embeddings.data"] for s in heads)
    assert not (exported("tiny-gpt2").directory / "head_00.data").exists()


def test_bert_padded_batch_equals_torch(exported, torch_model):
    model, session = torch_model("tiny-bert"), hermes_ort.InferenceSession(exported("tiny-bert").directory)
    feed = bert.example_feed(model, np.random.default_rng(3), batch=3, seq=10)
    out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    got = outputs(session, feed)
    assert np.max(np.abs(got["last_hidden_state"] - out.last_hidden_state.detach().numpy())) <= 1e-4
    assert np.max(np.abs(got["pooler_output"] - out.pooler_output.detach().numpy())) <= 1e-4


def test_vit_classifier_equals_torch(exported, torch_model):
    model, session = torch_model("tiny-vit"), hermes_ort.InferenceSession(exported("tiny-vit").directory)
    feed = vit.example_feed(model, np.random.default_rng(4), batch=3)
    want = model(pixel_values=torch.from_numpy(feed["pixel_values"])).logits.detach().numpy()
    assert np.max(np.abs(outputs(session, feed)["logits"] - want)) <= 1e-4


def test_unknown_name_lists_known_ones(tmp_path):
    from export.build import export_model

    with pytest.raises(HermesError, match="gpt2-medium"):
        export_model("gpt5", tmp_path / "x", progress=False)


def test_unsupported_family_is_named(tmp_path):
    from export.build import export_model

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "falcon"}')
    with pytest.raises(HermesError, match="falcon.*supported: bert, gpt2, llama, mistral, qwen2, vit"):
        export_model(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_check_leaves_nothing_that_looks_like_a_model(tmp_path, monkeypatch):
    from export import build

    monkeypatch.setattr(build, "TOLERANCE", -1.0)  # every export now fails its self-check
    with pytest.raises(build.ExportError, match="differs from torch"):
        build.export_model("tiny-bert", tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_replace_a_foreign_directory(tmp_path):
    from export.build import export_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(HermesError, match="not a model directory"):
        export_model("tiny-vit", tmp_path / "m", progress=False)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_blocks_read_only_their_own_files(exported):
    """Regression: freshly initialised LayerNorms are equal across blocks; sharing their bytes made every
    block depend on block_00.data."""
    for stage in hermes_ort.InferenceSession(exported("tiny-bert").directory).manifest.stages:
        assert [w.path for w in stage.weights] == [f"{stage.name}.data"]


def test_onnxsim_shrinks_stage_graphs(exported, tmp_path):
    import onnx

    from export.build import export_model

    plain = export_model("tiny-gpt2", tmp_path / "plain", simplify=False, progress=False).directory
    nodes = lambda d: len(onnx.load(str(d / "block_00.onnx"), load_external_data=False).graph.node)
    assert nodes(exported("tiny-gpt2").directory) < nodes(plain)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_llama_family_greedy_equals_transformers(exported, torch_model, name):
    """The converter's graphs filled from torch weights: 16 cached greedy steps of a left-padded batch."""
    import torch

    model = torch_model(name)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 6))
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=16,
                              do_sample=False, pad_token_id=0).numpy()
    got = hermes_ort.generate(exported(name).directory, ids, 16, attention_mask=mask)
    assert got.tolist() == want.tolist()
    assert len(set(got[0, 6:].tolist())) >= 4  # weights at 10x scale: continuations vary, a wrong cache shows


def test_llama_folder_export_equals_the_named_model(exported, torch_model, tmp_path):
    """python -m export FOLDER for a saved LlamaForCausalLM: same stages, same numbers as the table name."""
    from export.build import export_model

    torch_model("tiny-llama").save_pretrained(tmp_path / "folder")
    folder = export_model(str(tmp_path / "folder"), tmp_path / "out", progress=False)
    assert folder.manifest.family == "llama" and folder.max_diff <= 1e-4
    named = exported("tiny-llama").manifest
    assert [s.weights[0].sha256 for s in folder.manifest.stages if s.weights] == [
        s.weights[0].sha256 for s in named.stages if s.weights]
