"""Drop-in for onnxruntime: an app written against onnxruntime streams its .onnx file through hermes_ort."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hermes_ort
from hermes_ort import model_cache
from hermes_ort.engine.memory import parse_budget, rss
from hermes_ort.format import manifest as manifest_io

APP = Path(__file__).parent / "apps" / "run_app.py"
WIDTH, LAYERS = 1024, 12  # 12 x 4 MiB of weights: streaming at a budget below the model shows


def write_mlp(path: Path, seed: int = 0) -> Path:
    """An MLP with `layers.N` node names (so it splits into blocks), weights in external data."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"layers.{i}.weight"))
        nodes += [helper.make_node("MatMul", [x, f"layers.{i}.weight"], [f"/layers.{i}/mm"], name=f"/layers.{i}/MatMul"),
                  helper.make_node("Tanh", [f"/layers.{i}/mm"], [f"/layers.{i}/out"], name=f"/layers.{i}/Tanh")]
        x = f"/layers.{i}/out"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    return path


def roomy() -> str:
    """A budget that keeps everything resident in this process, whatever earlier tests left in it."""
    return f"{(rss() >> 20) + 512}MiB"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_app(model: Path, out: Path, *flags, env=None) -> int:
    done = subprocess.run([sys.executable, str(APP), str(model), str(out), *flags], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def test_unchanged_app_streams_within_the_budget(tmp_path, cache):
    model = write_mlp(tmp_path / "mlp.onnx")
    budget = "120MiB"  # the model is 48 MiB of weights; the app's process holds ~73 MiB before it loads any
    run_app(model, tmp_path / "want.npy")
    peak = run_app(model, tmp_path / "got.npy", "--hermes",
                   env={model_cache.CACHE_ENV: str(cache), "HERMES_ORT_MEMORY_BUDGET": budget})
    want, got = np.load(tmp_path / "want.npy"), np.load(tmp_path / "got.npy")
    assert np.max(np.abs(got - want)) <= 1e-4
    assert peak <= parse_budget(budget, 0)
    entries = model_cache.entries(cache)
    assert len(entries) == 1 and entries[0].source == str(model.resolve())
    manifest = manifest_io.load(entries[0].directory)  # (this test process alone holds more than the budget)
    assert sum(s.kind == "block" for s in manifest.stages) == LAYERS


def test_budget_from_session_options_and_streaming_plan(tmp_path, cache):
    model = write_mlp(tmp_path / "mlp.onnx")
    budget = int(((rss() >> 20) + 40) / 0.97)  # what earlier tests left, + in flight and a few stages, + margin
    options = hermes_ort.SessionOptions()
    options.add_session_config_entry("hermes.memory_budget", f"{budget}MiB")
    session = hermes_ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    assert session.budget == budget << 20 and session.get_session_options() is options
    assert len(session.plan.resident) < len(session.manifest.stages)  # it streams
    x = np.ones((1, WIDTH), np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.max(np.abs(session.run(None, {"x": x})[0] - want)) <= 1e-4


def test_two_processes_on_a_cold_cache_leave_one_entry(tmp_path, cache):
    model = write_mlp(tmp_path / "mlp.onnx")
    env = {**os.environ, model_cache.CACHE_ENV: str(cache), "HERMES_ORT_MEMORY_BUDGET": "1GiB"}
    procs = [subprocess.Popen([sys.executable, str(APP), str(model), str(tmp_path / f"out{k}.npy"), "--hermes"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert np.array_equal(np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy"))
    assert len(model_cache.entries(cache)) == 1
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [model_cache.entries(cache)[0].key]  # no leftovers


def test_a_changed_model_file_is_split_again(tmp_path, cache):
    model = write_mlp(tmp_path / "mlp.onnx", seed=0)
    first = hermes_ort.InferenceSession(str(model), memory_budget=roomy()).directory
    write_mlp(model, seed=1)  # new weights, same path
    second = hermes_ort.InferenceSession(str(model), memory_budget=roomy())
    assert second.directory != first and not first.exists()  # the stale entry of that path is gone
    x = np.ones((1, WIDTH), np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.max(np.abs(second.run(None, {"x": x})[0] - want)) <= 1e-4


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, cache):
    model = write_mlp(tmp_path / "mlp.onnx")
    entry = hermes_ort.InferenceSession(str(model), memory_budget=roomy()).directory
    victim = sorted(entry.glob("block_*.data"))[3]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    session = hermes_ort.InferenceSession(str(model), memory_budget=roomy())
    assert session.directory == entry and victim.stat().st_size > 1000
    x = np.ones((1, WIDTH), np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.max(np.abs(session.run(None, {"x": x})[0] - want)) <= 1e-4


def test_model_bytes_are_split_the_same_way(tmp_path, cache):
    small = tmp_path / "small.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "layers.0.w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "layers.0.w"], ["y"], name="/layers.0/MatMul")],
                              "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), small)
    session = hermes_ort.InferenceSession(small.read_bytes(), memory_budget=roomy())
    assert np.array_equal(session.run(["y"], {"x": np.ones((1, 4), np.float32)})[0], np.full((1, 4), 2, np.float32))
    assert model_cache.entries(cache)[0].source == "<model bytes>"


def test_what_ort_apps_touch(tmp_path, cache):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    assert hermes_ort.get_available_providers() == ["CPUExecutionProvider"] and hermes_ort.get_device() == "CPU"
    assert hermes_ort.onnxruntime_version == ort.__version__ and hermes_ort.__version__
    assert hermes_ort.GraphOptimizationLevel is ort.GraphOptimizationLevel and hermes_ort.RunOptions is ort.RunOptions
    session = hermes_ort.InferenceSession(str(write_mlp(tmp_path / "mlp.onnx")), memory_budget=roomy())
    (arg,) = session.get_inputs()
    assert (arg.name, arg.type, arg.shape) == ("x", "tensor(float)", ["batch", WIDTH])
    with pytest.raises(InvalidArgument, match="'y'"):  # what ORT raises for an unknown input name
        session.run(None, {"y": np.ones((1, WIDTH), np.float32)})
    with pytest.raises(NotImplementedError, match="io_binding"):
        session.io_binding()
    with pytest.raises(hermes_ort.InputError, match="CPUExecutionProvider"):
        hermes_ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CUDAExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        hermes_ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"], memory_budget=roomy())


def test_hermes_cache_ls_and_clear(tmp_path, cache, capsys):
    from hermes_ort.__main__ import main

    hermes_ort.InferenceSession(str(write_mlp(tmp_path / "mlp.onnx")), memory_budget=roomy())
    assert main(["cache", "ls"]) == 0
    assert str((tmp_path / "mlp.onnx").resolve()) in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "freed" in capsys.readouterr().out and model_cache.entries(cache) == []
    session = hermes_ort.InferenceSession(str(tmp_path / "mlp.onnx"), memory_budget=roomy())
    assert main(["cache", "clear"]) == 0  # the entry an open session reads stays, and it still runs
    assert "kept 1 entries that open sessions still read" in capsys.readouterr().out
    assert len(model_cache.entries(cache)) == 1 and session.run(None, {"x": np.ones((1, WIDTH), np.float32)})
    session.close()
    assert main(["cache", "clear"]) == 0 and model_cache.entries(cache) == []


def test_session_options_reach_every_stage_session_and_modelmeta_answers(tmp_path, cache, monkeypatch):
    real, created = ort.InferenceSession, []

    def creating(model, sess_options=None, *args, **kwargs):
        created.append((sess_options.intra_op_num_threads, sess_options.log_severity_level))
        return real(model, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", creating)
    options = hermes_ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 3, 0  # 3: more than any plan picks here
    session = hermes_ort.InferenceSession(str(write_mlp(tmp_path / "mlp.onnx")), options, memory_budget=roomy())
    session.run(None, {"x": np.ones((2, WIDTH), np.float32)})
    assert session.plan.compute_threads == 3 and created and set(created) == {(3, 0)}
    created.clear()
    default = hermes_ort.InferenceSession(str(tmp_path / "mlp.onnx"), memory_budget=roomy())
    default.run(None, {"x": np.ones((2, WIDTH), np.float32)})
    assert {level for _, level in created} == {3}  # quiet unless asked: ORT's warnings name internal stages
    meta = session.get_modelmeta()
    assert meta.producer_name == "hermes-ort" and meta.graph_name == session.manifest.family == "onnx" and meta.version == 1
    assert "source" in meta.custom_metadata_map and all(isinstance(v, str) for v in meta.custom_metadata_map.values())
