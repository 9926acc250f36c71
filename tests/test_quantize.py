"""hermes quantize: ORT's MatMulNBits stages, streamed equal to the same quantized graphs merged."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest

import hermes_ort
from hermes_ort import __main__ as cli
from hermes_ort.convert.quantize import QuantizeError, QuantizeSettings, quantize_dir
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.graphs.merge import merge_stages
from hermes_ort.planning.planner import Plan

from conftest import TINY

pytest.importorskip("onnx_ir", reason="onnxruntime's matmul_nbits_quantizer needs onnx-ir")


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """(name, bits) -> the quantized directory, made once."""
    cache = {}

    def get(name: str, bits: int):
        if (name, bits) not in cache:
            out = tmp_path_factory.mktemp("q") / f"{name}-int{bits}"
            quantize_dir(exported(name).directory, out, QuantizeSettings(bits=bits))
            cache[name, bits] = out
        return cache[name, bits]

    return get


def streamed(directory):
    names = tuple(s.name for s in hermes_ort.InferenceSession(directory).manifest.stages)
    plan = Plan(budget=0, loaders=2, window=2, resident=(), prepacked=names, compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)
    return hermes_ort.InferenceSession(directory, plan_override=plan)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", TINY)
def test_streamed_quantized_stages_equal_the_merged_quantized_model(quantized, name, bits):
    directory = quantized(name, bits)
    with streamed(directory) as session:
        feed = synthetic_feed(session.manifest, {"sequence": 8}, seed=1)
        names = [o.name for o in session.get_outputs()]
        got = session.run(names, feed)
        whole = ort.InferenceSession(str(merge_stages(directory, session.manifest)), providers=["CPUExecutionProvider"])
        want = whole.run(names, {k: v for k, v in feed.items() if k in {i.name for i in whole.get_inputs()}})
    for n, g, w in zip(names, got, want):
        assert np.max(np.abs(g - w)) <= 1e-5 * max(1.0, np.max(np.abs(w))), n


@pytest.mark.parametrize("name", TINY)
def test_manifest_states_precision_and_drift(exported, quantized, name):
    m = hermes_ort.InferenceSession(quantized(name, 4)).manifest
    assert (m.extra["precision"], m.extra["bits"], m.extra["head_bits"], m.extra["block_size"]) == ("int4", 4, 8, 32)
    assert m.extra["accuracy_level"] == 0 and set(m.extra["drift"]) == {
        o.name for o in m.outputs if not o.name.startswith("present.")}
    ops = {n.op_type for s in m.stages if s.kind == "block"
           for n in onnx.load(str(quantized(name, 4) / s.graph.path), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and not ops & {"MatMul", "Gemm"} - {"MatMul"}  # every weight matrix quantized
    assert m.bytes < exported(name).manifest.bytes


def test_generation_on_a_quantized_decoder_equals_the_merged_model(quantized):
    from bench.generate import WholeModel, decode

    directory = quantized("tiny-gpt2", 4)
    manifest = hermes_ort.InferenceSession(directory).manifest
    merge_stages(directory, manifest)
    _, want = decode(WholeModel(directory), manifest, 2, 12)
    with streamed(directory) as session:
        got = hermes_ort.generate(session, np.random.default_rng(0).integers(1, 2048, (2, 32)), 12)
    assert got[:, 32:].tolist() == want.tolist()


def test_tied_head_shares_the_embedding_table(exported, quantized, tmp_path):
    """small-gpt2's head (4 MiB at 8 bits) points into the embeddings' quantized table: stored once."""
    src = exported("small-gpt2").directory
    m = quantize_dir(src, tmp_path / "q8", QuantizeSettings(bits=8), check_drift=False)
    heads = [s for s in m.stages if s.kind == "head"]
    for s in heads:  # its own file holds only ln_f; the matrix bytes are the table's
        assert "embeddings.data" in {w.path for w in s.weights}
        assert sum(w.bytes for w in s.weights if w.path != "embeddings.data") < 64 << 10
    embeddings = onnx.load(str(tmp_path / "q8" / "embeddings.onnx"), load_external_data=False)
    assert "GatherBlockQuantized" in {n.op_type for n in embeddings.graph.node}
    with hermes_ort.InferenceSession(src) as fp32, hermes_ort.InferenceSession(tmp_path / "q8") as q8:
        feed = synthetic_feed(fp32.manifest, {"sequence": 16}, seed=2)
        feed["input_ids"] = np.random.default_rng(2).integers(0, 8192, feed["input_ids"].shape)
        a, b = fp32.run(["logits"], feed)[0], q8.run(["logits"], feed)[0]
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9  # real-scale weights: 8 bits keeps the top token
    # the lookup through the head's bytes (two 4-bit halves) is the table to within half a quantization step
    lookups = [ort.InferenceSession(str(d / "embeddings.onnx")) for d in (src, tmp_path / "q8")]
    stage_feed = {i.name: feed[i.name] for i in lookups[0].get_inputs()}
    want, got = (s.run(None, stage_feed)[0] for s in lookups)
    table = next(numpy_helper.to_array(t) for t in onnx.load(str(src / "embeddings.onnx")).graph.initializer
                 if t.dims and t.dims[0] >= 8192)
    assert 0 < np.max(np.abs(got - want)) <= np.abs(table).max() / 127 / 2 * 1.001


def test_quantizing_twice_says_so_in_one_line(quantized, tmp_path, capsys):
    assert cli.main(["quantize", str(quantized("tiny-bert", 8)), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already quantized (int8)" in err
    assert not (tmp_path / "again").exists()


def test_nothing_to_quantize_says_so(tmp_path, capsys):
    """A graph with no weight matrix: split into stages, then quantize refuses in one line."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
                              "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    assert cli.main(["split", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "d"), "--stages", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["quantize", str(tmp_path / "d"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no MatMul or Gemm with a constant weight to quantize" in err
    assert not (tmp_path / "q").exists()


def test_bad_settings_are_refused(exported, tmp_path):
    with pytest.raises(QuantizeError, match="block size"):
        quantize_dir(exported("tiny-bert").directory, tmp_path / "q", QuantizeSettings(block_size=512))
    with pytest.raises(QuantizeError, match="bits"):
        quantize_dir(exported("tiny-bert").directory, tmp_path / "q", QuantizeSettings(bits=3))
    with pytest.raises(QuantizeError, match="scheme must be one of minmax, symmetric, got 'gptq'"):
        quantize_dir(exported("tiny-bert").directory, tmp_path / "q", QuantizeSettings(scheme="gptq"))
    assert not (tmp_path / "q").exists()


def test_the_manifest_records_the_scheme(exported, tmp_path):
    """--scheme symmetric through the CLI: no block-sum term in the graphs, and the manifest says which."""
    out = tmp_path / "sym"
    assert cli.main(["quantize", str(exported("tiny-gpt2").directory), "--out", str(out), "--bits", "4",
                     "--scheme", "symmetric"]) == 0
    manifest = hermes_ort.InferenceSession(out).manifest
    assert manifest.extra["scheme"] == "symmetric"
    block = onnx.load(str(out / manifest.stages[1].graph.path), load_external_data=False)
    assert "ReduceSum" not in {n.op_type for n in block.graph.node}


def test_export_bits_publishes_only_the_quantized_directory(tmp_path):
    from hermes_ort_export.__main__ import main

    assert main(["tiny-vit", "--random-weights", "--out", str(tmp_path / "v4"), "--bits", "4"]) == 0
    manifest = json.loads((tmp_path / "v4" / "manifest.json").read_text())
    assert manifest["extra"]["precision"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v4"]  # no fp32 scratch left beside it
