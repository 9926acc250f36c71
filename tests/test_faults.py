"""Unattended for months (part of it): budgets that cannot be read or cannot be had, and long runs that
must not grow."""
from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import onnxruntime
import psutil
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

import hermes_ort
from hermes_ort.__main__ import main
from hermes_ort.engine import loading
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import parse_budget
from hermes_ort.engine.plan import Plan
from hermes_ort.format import manifest as manifest_io
from hermes_ort.errors import BudgetError, RunTerminated, StageError

ROOT = Path(__file__).resolve().parents[1]



@pytest.mark.parametrize("text, expected", [("400MB", 400_000_000), ("0.4GiB", int(0.4 * 2**30)),
                                            (400_000_000, 400_000_000), ("25%", 250_000_000)])
def test_budgets_that_parse(text, expected):
    assert parse_budget(text, 10**9) == expected


def test_a_budget_that_does_not_parse_is_one_line(exported, capsys):
    with pytest.raises(BudgetError, match="'lots'"):
        parse_budget("lots", 10**9)
    assert main(["run", str(exported("tiny-bert").directory), "--budget", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot read 'lots' as a size" in err


def test_a_budget_above_the_machine_warns(exported):
    too_much = psutil.virtual_memory().total * 2
    with pytest.warns(UserWarning, match="above this machine's memory"):
        hermes_ort.InferenceSession(exported("tiny-bert").directory, memory_budget=too_much)


def test_long_runs_do_not_grow(exported):
    """1,000 streamed runs then 200 generations of tiny-gpt2 in a fresh process (bench/soak.py): RSS within
    5% of where it stood after 10, and no thread or file descriptor more."""
    done = subprocess.run([sys.executable, "-m", "bench.soak", str(exported("tiny-gpt2").directory), "--runs", "1000",
                           "--generations", "200", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(name, phase["calls"]) for name, phase in seen["phases"].items()] == [("streamed runs", 1000),
                                                                                  ("generations", 200)]
    for phase in seen["phases"].values():
        early, late = phase["after 10"], phase["at the end"]
        assert late["rss"] <= 1.05 * early["rss"], seen
        assert late["threads"] == early["threads"] and late["fds"] == early["fds"], seen


CONCURRENT = r"""
import json, sys, threading
import numpy as np
import hermes_ort
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import peak_rss
directory, budget = sys.argv[1], sys.argv[2]
with hermes_ort.InferenceSession(directory, memory_budget=budget) as session:
    feeds = []
    for k in range(4):
        feed = synthetic_feed(session.manifest, {"sequence": 16}, seed=k)
        feed["input_ids"] = np.random.default_rng(k).integers(0, 8000, (1, 16))
        feeds.append(feed)
    alone = [session.run(["logits"], f)[0] for f in feeds]
    results, errors = {}, []
    def work(k):
        try:
            for _ in range(5):
                results.setdefault(k, []).append(session.run(["logits"], feeds[k])[0])
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    same = all(np.array_equal(r, alone[k]) for k, rs in results.items() for r in rs)
    streamed = len(session.plan.resident) < len(session.manifest.stages)
print(json.dumps({"same": same, "errors": errors, "runs": sum(map(len, results.values())),
                  "peak": peak_rss(), "streamed": streamed}))
"""


def test_threads_sharing_a_session_get_their_own_answers_within_the_budget(exported):
    """Four threads, five runs each, on one InferenceSession streaming small-gpt2 (116 MB) at 150 MiB: runs
    are serialised (a pass at a time shares the resident stages), every result equals the same input run
    alone, and the process's peak stays within the budget."""
    done = subprocess.run([sys.executable, "-c", CONCURRENT, str(exported("small-gpt2").directory), "150MiB"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["errors"] == [] and seen["runs"] == 20 and seen["same"] and seen["streamed"]
    assert seen["peak"] <= 150 << 20


def streamed(directory, **options):
    """A session that loads every stage on every run, two loaders ahead."""
    plan = Plan(budget=0, loaders=2, window=3, resident=(), prepacked=(), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)
    return hermes_ort.InferenceSession(directory, plan_override=plan, **options)


def engine_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("loader-", "daemon"))]


def test_ort_failing_to_create_a_session_reaches_the_caller_and_releases_every_session(exported, monkeypatch):
    directory = exported("tiny-gpt2").directory
    feed = synthetic_feed(hermes_ort.InferenceSession(directory).manifest, {"sequence": 6})
    (expected,) = hermes_ort.InferenceSession(directory).run(["logits"], feed)
    real, made, failing = onnxruntime.InferenceSession, [], [3]

    def creating(*args, **kwargs):  # as ORT fails when memory runs out or a kernel is missing
        if len(made) + 1 in failing:
            failing.clear()
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation")
        made.append(weakref.ref(session := real(*args, **kwargs)))
        return session

    monkeypatch.setattr(onnxruntime, "InferenceSession", creating)
    session = streamed(directory)
    with pytest.raises(StageError, match="stage '(\\w+)' \\(\\1.onnx\\): (cannot load|loading failed).*bad allocation"):
        session.run(["logits"], feed)
    assert engine_threads() == []
    np.testing.assert_array_equal(session.run(["logits"], feed)[0], expected)  # the same object works again
    session.close()
    gc.collect()
    assert made and all(ref() is None for ref in made)  # the object lives on; not one ORT session does


def test_run_options_terminate_stops_a_run_between_stages(exported, monkeypatch):
    directory = exported("tiny-gpt2").directory
    session = streamed(directory)
    feed = synthetic_feed(session.manifest, {"sequence": 6})
    (expected,) = session.run(["logits"], feed)
    options, real = hermes_ort.RunOptions(), loading.prepare

    def prepare(directory, stage, *rest):  # another thread asks the run to stop while it is under way: the
        if stage.name == "head_00":  # 4th load waits for a window slot, freed once embeddings have run
            options.terminate = True
        return real(directory, stage, *rest)

    monkeypatch.setattr(loading, "prepare", prepare)
    with pytest.raises(Fail, match="run stopped by run_options.terminate before stage '(block|head)") as caught:
        session.run(["logits"], feed, options)
    assert isinstance(caught.value, RunTerminated) and engine_threads() == []
    np.testing.assert_array_equal(session.run(["logits"], feed, hermes_ort.RunOptions())[0], expected)
    session.close()


DIES_AT_THE_THIRD_STAGE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import hermes_ort.format.stage_files as stage_files
real, calls = stage_files.write_stage, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os._exit(70)  # as a kill or a power cut: no exception, no cleanup
    return real(*args, **kwargs)
stage_files.write_stage = dying  # before the exporter and converter import it
from hermes_ort_export.__main__ import main as export
from hermes_ort.__main__ import main as hermes
sys.exit((export if sys.argv[2] == "export" else hermes)(sys.argv[3:]))
"""


@pytest.mark.parametrize("tool", ["export", "convert"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_build_killed_half_way_leaves_the_old_model_or_none_and_the_rerun_finishes(tool, existing, tmp_path,
                                                                                    exported):
    from tiny_gguf import write_tiny_gguf

    out = tmp_path / "m"
    if tool == "export":
        args, module = ["tiny-gpt2", "--random-weights", "--out", str(out)], "export"
    else:
        write_tiny_gguf(tmp_path / "tiny.gguf")
        args, module = ["convert", str(tmp_path / "tiny.gguf"), "--out", str(out)], "hermes_ort"
    if existing:  # the model the board runs today
        shutil.copytree(exported("tiny-llama").directory, out)
        before = manifest_io.load(out, deep=True)
    killed = subprocess.run([sys.executable, "-c", DIES_AT_THE_THIRD_STAGE, str(ROOT), tool, *args],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 70, killed.stderr
    assert manifest_io.load(out, deep=True) == before if existing else not out.exists()
    hidden = lambda: [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".m.")]
    assert [name.split("-")[0] for name in hidden()] == [".m.partial"]  # what the kill left, out of the way
    rerun = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr
    after = manifest_io.load(out, deep=True)
    assert after.family == ("gpt2" if tool == "export" else "llama") and not (existing and after == before)
    assert hidden() == []  # swept
