"""hermes split on whole-model ONNX files from torch.onnx: the chained stages give the whole model's outputs."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import hermes_ort
from hermes_ort.__main__ import main as hermes
from hermes_ort.errors import SplitError
from hermes_ort.format import manifest as manifest_io
from hermes_ort.engine.chain import run_chain
from hermes_ort.engine.sessions import SessionConfig, open_stage
from hermes_ort.graphs.split import SplitRequest, split_model
from hermes_ort.engine.prepared import OwnedStage


class WholeBert(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


class WholeGPT2(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # GPT-2's legacy export needs the mask given explicitly
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-gpt2"])
def whole(request, torch_model, tmp_path_factory):
    """(path of a whole-model .onnx written by torch.onnx, a feed for it)."""
    model = torch_model(request.param)
    wrapper = WholeBert(model) if request.param == "tiny-bert" else WholeGPT2(model)
    names = ["last_hidden_state", "pooler_output"] if request.param == "tiny-bert" else ["logits"]
    path = tmp_path_factory.mktemp("whole") / f"{request.param}.onnx"
    args = (torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long))
    axes = {n: {0: "batch", 1: "sequence"} for n in ["input_ids", "attention_mask", *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, path, input_names=["input_ids", "attention_mask"], output_names=names,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 1000, (2, 7)), "attention_mask": np.ones((2, 7), np.int64)}
    return path, feed


ORT_DEFAULTS = SessionConfig(optimization="all", prepacking=True, shared_arena=False)


def max_diff(whole_path, model_dir, feed):
    """Stages chained with ORT's default session options against the whole model: the split itself must
    change nothing (0.0 when cut at block boundaries). The streaming engine, whose kernels differ
    (no prepacking), is checked too, within fp32 noise."""
    want = ort.InferenceSession(str(whole_path)).run(None, feed)
    manifest = manifest_io.load(model_dir)
    chained = run_chain(manifest, feed, lambda i: OwnedStage(manifest.stages[i], open_stage(
        model_dir, manifest.stages[i], ORT_DEFAULTS)))
    streamed = hermes_ort.InferenceSession(model_dir).run(None, feed)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(want, streamed)) <= 1e-5
    return max(float(np.max(np.abs(a - chained[o.name]))) for a, o in zip(
        want, ort.InferenceSession(str(whole_path)).get_outputs()))


def test_split_by_block_names_is_exact(whole, tmp_path):
    path, feed = whole
    manifest = split_model(path, tmp_path / "m")
    assert [s.name for s in manifest.stages][:3] == ["embeddings", "block_00", "block_01"]
    assert max_diff(path, tmp_path / "m", feed) == 0.0


@pytest.mark.parametrize("stages", [2, 3, 5])
def test_split_into_n_balanced_stages(whole, tmp_path, stages):
    path, feed = whole
    manifest = split_model(path, tmp_path / "m", SplitRequest(stages=stages))
    assert len(manifest.stages) == stages
    assert max_diff(path, tmp_path / "m", feed) <= 1e-5


def test_split_at_named_tensors(whole, tmp_path):
    path, feed = whole
    auto = split_model(path, tmp_path / "auto")
    cut = auto.stages[1].outputs[0].name  # the first block's output
    manifest = split_model(path, tmp_path / "m", SplitRequest(cuts=(cut,)))
    assert len(manifest.stages) == 2 and cut in [t.name for t in manifest.stages[0].outputs]
    assert max_diff(path, tmp_path / "m", feed) == 0.0


def test_split_at_two_named_tensors_gives_three_stages(whole, tmp_path, capsys):
    """Regression: two --cut tensors gave two stages, silently, when one stage came out empty."""
    path, feed = whole
    blocks = [s.outputs[0].name for s in split_model(path, tmp_path / "auto").stages if s.kind == "block"]
    args = ["split", str(path), "--out", str(tmp_path / "m"), "--cut", blocks[0], "--cut", blocks[1]]
    assert hermes(args) == 0 and "3 stages" in capsys.readouterr().out
    manifest = manifest_io.load(tmp_path / "m")
    assert [blocks[k] in [t.name for t in manifest.stages[k].outputs] for k in (0, 1)] == [True, True]
    assert max_diff(path, tmp_path / "m", feed) == 0.0


@pytest.mark.parametrize("order", ["reversed", "repeated", "last"])
def test_cuts_that_add_no_stage_are_refused(whole, tmp_path, order):
    path, _ = whole
    auto = split_model(path, tmp_path / "auto")
    first, second = [s.outputs[0].name for s in auto.stages if s.kind == "block"][:2]
    cuts, named = {"reversed": ((second, first), first), "repeated": ((first, first), first),
                   "last": ((first, auto.outputs[-1].name), "nothing is left")}[order]
    with pytest.raises(SplitError, match=named):
        split_model(path, tmp_path / "m", SplitRequest(cuts=cuts))
    assert not (tmp_path / "m").exists()


def test_split_reads_external_data_source(whole, tmp_path):
    path, feed = whole
    model = onnx.load(str(path))
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin",
                    size_threshold=0)
    split_model(tmp_path / "ext.onnx", tmp_path / "m")
    assert max_diff(path, tmp_path / "m", feed) == 0.0


def test_split_cli(whole, tmp_path, capsys):
    path, feed = whole
    assert hermes(["split", str(path), "--out", str(tmp_path / "m"), "--stages", "2"]) == 0
    assert "2 stages" in capsys.readouterr().out
    assert max_diff(path, tmp_path / "m", feed) <= 1e-5


def test_split_errors_name_the_problem(whole, tmp_path, capsys):
    path, _ = whole
    with pytest.raises(SplitError, match="no-such-tensor"):
        split_model(path, tmp_path / "m", SplitRequest(cuts=("no-such-tensor",)))
    assert not (tmp_path / "m").exists()
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    assert hermes(["split", str(tmp_path / "bad.onnx"), "--out", str(tmp_path / "m")]) == 2
    assert "bad.onnx" in capsys.readouterr().err
