import json

import numpy as np
import pytest
import torch

import hermes_ort
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort_export import bert, gpt2, vit
from hermes_ort_export.configs import NAMED
from hermes_ort_export.families import FAMILIES
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
    from hermes_ort_export.build import export_model

    with pytest.raises(HermesError, match="gpt2-medium"):
        export_model("gpt5", tmp_path / "x", progress=False)
    with pytest.raises(HermesError, match="gpt2-medium"):
        export_model("gpt5", tmp_path / "x", progress=False, random_weights=True)


def hub_cache(monkeypatch, path):
    """The Hugging Face cache at `path`, offline: as on a board without the network, the local cache only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub was imported: set both
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(path))


def test_a_published_name_means_its_real_weights_and_says_so_when_they_cannot_be_had(tmp_path, monkeypatch, capsys):
    from hermes_ort_export.__main__ import main as export

    hub_cache(monkeypatch, tmp_path / "empty-cache")
    assert export(["gpt2-medium", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot get 'gpt2-medium' (openai-community/gpt2-medium) from the Hugging Face" \
        in err and "--random-weights" in err
    assert not (tmp_path / "m").exists()
    assert export(["tiny-gpt2", "--out", str(tmp_path / "m")]) == 2
    assert "'tiny-gpt2' is a test shape with no published weights: pass --random-weights" in capsys.readouterr().err


def test_a_name_in_the_local_hub_cache_exports_the_cached_weights(tmp_path, monkeypatch, capsys, torch_model,
                                                                  exported):
    """The real path for `python -m export gpt2`: the model's files from the Hugging Face cache (filled here
    by hand with a small GPT-2 saved by transformers, as a download would have left it)."""
    from hermes_ort_export.__main__ import main as export
    from hermes_ort.__main__ import main as hermes

    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    model = torch_model("tiny-gpt2")
    model.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    hub_cache(monkeypatch, tmp_path / "hub")
    assert export(["gpt2", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported gpt2: ") and "random" not in out
    manifest = hermes_ort.InferenceSession(tmp_path / "m").manifest
    assert manifest.extra["random_weights"] is False and manifest.config["n_embd"] == 64
    feed = synthetic_feed(manifest, {"sequence": 5})
    (cached,) = hermes_ort.InferenceSession(tmp_path / "m").run(["logits"], feed)  # the cache's weights, which
    (saved,) = hermes_ort.InferenceSession(exported("tiny-gpt2").directory).run(["logits"], feed)  # were these
    np.testing.assert_allclose(cached, saved, atol=1e-5)
    assert hermes(["verify", str(tmp_path / "m")]) == 0 and "random" not in capsys.readouterr().out
    assert export(["tiny-gpt2", "--random-weights", "--out", str(tmp_path / "r")]) == 0
    assert "exported tiny-gpt2 (seeded random weights, seed 0): " in capsys.readouterr().out
    assert hermes(["verify", str(tmp_path / "r")]) == 0
    assert f"{tmp_path / 'r'} (seeded random weights, seed 0): 6 stages" in capsys.readouterr().out


def test_unsupported_family_is_named(tmp_path):
    from hermes_ort_export.build import export_model

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "falcon"}')
    with pytest.raises(HermesError, match="falcon.*supported: bert, gpt2, llama, mistral, qwen2, vit"):
        export_model(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_check_leaves_nothing_that_looks_like_a_model(tmp_path, monkeypatch):
    from hermes_ort_export import build

    monkeypatch.setattr(build, "TOLERANCE", -1.0)  # every export now fails its self-check
    with pytest.raises(build.ExportError, match="differs from torch"):
        build.export_model("tiny-bert", tmp_path / "m", progress=False, random_weights=True)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_replace_a_foreign_directory(tmp_path):
    from hermes_ort_export.build import export_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(HermesError, match="not a model directory"):
        export_model("tiny-vit", tmp_path / "m", progress=False, random_weights=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_blocks_read_only_their_own_files(exported):
    """Regression: freshly initialised LayerNorms are equal across blocks; sharing their bytes made every
    block depend on block_00.data."""
    for stage in hermes_ort.InferenceSession(exported("tiny-bert").directory).manifest.stages:
        assert [w.path for w in stage.weights] == [f"{stage.name}.data"]


def test_onnxsim_shrinks_stage_graphs(exported, tmp_path):
    import onnx

    from hermes_ort_export.build import export_model

    plain = export_model("tiny-gpt2", tmp_path / "plain", simplify=False, progress=False, random_weights=True).directory
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
    from hermes_ort_export.build import export_model

    torch_model("tiny-llama").save_pretrained(tmp_path / "folder")
    folder = export_model(str(tmp_path / "folder"), tmp_path / "out", progress=False)
    assert folder.manifest.family == "llama" and folder.max_diff <= 1e-4
    named = exported("tiny-llama").manifest
    assert [s.weights[0].sha256 for s in folder.manifest.stages if s.weights] == [
        s.weights[0].sha256 for s in named.stages if s.weights]
