"""The budget is the OS's figure: peak RSS (ru_maxrss) of a fresh process stays at or below it."""
import json
import subprocess
import sys

import pytest

from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning import profiles
from hermes_ort.engine.memory import format_bytes
from hermes_ort.planning.planner import minimum_budget

MiB = 1 << 20
PEAK_OF_RUN = """
import json, sys
from hermes_ort import InferenceSession
from hermes_ort.format import manifest
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import peak_rss
budget = int(sys.argv[2])
with InferenceSession(sys.argv[1], memory_budget=budget) as s:
    s.run(None, synthetic_feed(s.manifest))
    s.run(None, synthetic_feed(s.manifest))
print(json.dumps({"peak": peak_rss(), "window": s.plan.window, "resident": len(s.plan.resident),
                  "predicted": s.plan.predicted_peak_bytes}))
"""
PEAK_OF_WHOLE = """
import json, sys
import onnxruntime as ort
from hermes_ort.format import manifest
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import peak_rss
from hermes_ort.graphs.merge import merge_stages
m = manifest.load(sys.argv[1])
ort.InferenceSession(str(merge_stages(m and __import__('pathlib').Path(sys.argv[1]), m))).run(None, synthetic_feed(m))
print(json.dumps({"peak": peak_rss()}))
"""


def fresh_process(script, *args):
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small(exported):
    directory = exported("small-gpt2").directory
    out = subprocess.run([sys.executable, "-m", "hermes_ort", "profile", str(directory)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return directory, profiles.load(directory)


@pytest.mark.parametrize("extra_mib", [8, 48])
def test_peak_rss_stays_within_the_budget(small, extra_mib):
    directory, profile = small
    budget = minimum_budget(profile) + extra_mib * MiB
    result = fresh_process(PEAK_OF_RUN, directory, budget)
    assert result["peak"] <= budget, f"peak {format_bytes(result['peak'])} over budget {format_bytes(budget)}"
    # the plan's own prediction holds too (2% for noise), so a wider window than planned shows
    assert result["peak"] <= 1.02 * result["predicted"], f"peak {format_bytes(result['peak'])} over predicted"


def test_the_budget_is_below_what_whole_model_ort_needs(small):
    directory, profile = small
    whole = fresh_process(PEAK_OF_WHOLE, directory)["peak"]
    assert minimum_budget(profile) + 48 * MiB < whole  # so the test above is not met trivially
    assert manifest_io.load(directory).bytes > 100 * MiB


def test_cli_rejects_an_infeasible_budget_with_the_minimum(small):
    directory, profile = small
    out = subprocess.run([sys.executable, "-m", "hermes_ort", "plan", str(directory), "--budget", "10MiB"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert f"smallest feasible plan, {format_bytes(minimum_budget(profile))}" in out.stderr


def test_cli_run_writes_outputs_and_trace(small, tmp_path):
    directory, profile = small
    budget = minimum_budget(profile) + 48 * MiB
    out = subprocess.run([sys.executable, "-m", "hermes_ort", "run", str(directory), "--budget", str(budget),
                          "--out", str(tmp_path / "out.npz"), "--trace", str(tmp_path / "t.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "peak RSS" in out.stdout and (tmp_path / "out.npz").is_file()
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    table = subprocess.run([sys.executable, "-m", "hermes_ort", "plan", str(directory)], capture_output=True,
                           text=True)
    assert table.returncode == 0 and len(table.stdout.strip().splitlines()) >= 4


def test_budget_as_a_share_of_the_model_through_plan_and_run(small, tmp_path):
    """`--budget N%` means N% of the model's bytes on disk, in `hermes plan` and in `hermes run` alike."""
    directory, profile = small
    model_bytes = manifest_io.load(directory).bytes
    share = -(-(minimum_budget(profile) + 48 * MiB) * 100 // model_bytes)  # a feasible share, in whole percent
    budget = format_bytes(share * model_bytes // 100)
    plan = subprocess.run([sys.executable, "-m", "hermes_ort", "plan", str(directory), "--budget", f"{share}%"],
                          capture_output=True, text=True)
    assert plan.returncode == 0 and f"budget {budget}" in plan.stdout, plan.stdout + plan.stderr
    run = subprocess.run([sys.executable, "-m", "hermes_ort", "run", str(directory), "--budget", f"{share}%"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and f"(budget {budget};" in run.stdout, run.stderr
    low = subprocess.run([sys.executable, "-m", "hermes_ort", "run", str(directory), "--budget", "25%"],
                         capture_output=True, text=True)
    assert low.returncode == 2 and f"budget {format_bytes(model_bytes // 4)} is below" in low.stderr


def test_peak_is_not_inherited_from_a_large_parent():
    """Regression: ru_maxrss of a child spawned by this (torch-sized) process reported the parent's size."""
    import torch  # noqa: F401  (makes this process large, as pytest with the exporter is)

    child = fresh_process("import json; from hermes_ort.engine.memory import peak_rss; print(json.dumps({'peak': peak_rss()}))")
    assert child["peak"] < 150 * MiB


def test_cli_run_reads_inputs_from_npz(small, tmp_path):
    import numpy as np

    import hermes_ort
    from hermes_ort.engine.feeds import synthetic_feed

    directory, _ = small
    with hermes_ort.InferenceSession(directory) as session:
        feed = synthetic_feed(session.manifest, {"sequence": 9}, seed=3)
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    np.savez(tmp_path / "in.npz", **feed)
    out = subprocess.run([sys.executable, "-m", "hermes_ort", "run", str(directory), "--inputs",
                          str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = np.load(tmp_path / "out.npz")
    assert np.array_equal(got["logits"], want["logits"]) and got["logits"].shape[1] == 9


SPLIT_PEAK = """
import json, sys
from hermes_ort.engine.memory import peak_rss, rss
from hermes_ort.graphs.split import split_model
base = rss()
manifest = split_model(sys.argv[1], sys.argv[2])
print(json.dumps({"base": base, "peak": peak_rss(), "bytes": manifest.bytes}))
"""


def test_split_streams_weights_tensor_by_tensor(small, tmp_path):
    """The splitter never holds the model's weights at once (what lets it cut models over 2 GB)."""
    from hermes_ort.graphs.merge import merge_stages

    directory, _ = small
    whole = merge_stages(directory, manifest_io.load(directory))
    result = fresh_process(SPLIT_PEAK, whole, tmp_path / "split")
    assert result["bytes"] > 100 * MiB
    assert result["peak"] - result["base"] < result["bytes"] / 3  # the largest tensor is wte: 16 MiB


ESTIMATED_RUN = """
import json, sys
from pathlib import Path
from hermes_ort import InferenceSession
from hermes_ort.format import manifest
from hermes_ort.planning.estimate import estimate_profile
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import peak_rss
from hermes_ort.planning.planner import minimum_budget
from hermes_ort.engine.templates import Templates
m = manifest.load(sys.argv[1])
budget = minimum_budget(estimate_profile(m, Templates(Path(sys.argv[1]), m))) + 8 * 2**20
with InferenceSession(sys.argv[1], memory_budget=budget) as s:
    s.run(None, synthetic_feed(m))
print(json.dumps({"peak": peak_rss(), "budget": budget, "streamed": len(m.stages) - len(s.plan.resident)}))
"""


def test_unprofiled_model_stays_within_the_estimated_plans_budget(small, tmp_path):
    import shutil

    directory, _ = small
    target = tmp_path / "unprofiled"
    shutil.copytree(directory, target, ignore=shutil.ignore_patterns("profile.json", "whole_model.onnx"))
    result = fresh_process(ESTIMATED_RUN, target)
    assert result["streamed"] > 0 and result["peak"] <= result["budget"]
