"""Warm-cache benchmarks start every measured run from a warm page cache, and say when the kernel reclaims
idle memory (bench/machine.py: such a kernel drops a model's files a minute after their last read)."""
import shutil
import types
from pathlib import Path

import pytest


class Calls:
    """Records, in order, the warms and the worker runs a benchmark makes."""

    def __init__(self):
        self.log = []

    def warm(self, directory, manifest):
        self.log.append("warm")

    def worker_runs_warm(self):
        """Every worker run right after a warm of the model."""
        runs = [k for k, entry in enumerate(self.log) if entry != "warm"]
        return bool(runs) and all(k > 0 and self.log[k - 1] == "warm" for k in runs)


def test_bench_generate_warms_the_model_right_before_every_worker(exported, tmp_path, monkeypatch):
    import bench.generate as generate

    model = tmp_path / "tiny-gpt2"
    shutil.copytree(exported("tiny-gpt2").directory, model)
    calls = Calls()

    def run_worker(*args):
        calls.log.append(args[2])  # the strategy
        return {"first_s": 0.1, "rate": 10.0, "step_s": 0.1, "peak": 1, "streamed_bytes": 0, "tokens": [[1]]}

    monkeypatch.setattr(generate, "warm", calls.warm)
    monkeypatch.setattr(generate, "run_worker", run_worker)
    bar = types.SimpleNamespace(update=lambda: None)
    generate.bench_model(model, ["1GiB", "2GiB"], [1], 2, repeats=2, bar=bar)
    assert calls.log.count("hermes") == 4 and calls.log.count("whole") == 2
    assert calls.worker_runs_warm(), calls.log


def test_bench_run_warms_the_model_right_before_every_warm_run_and_never_before_a_cold_one(exported, tmp_path,
                                                                                          monkeypatch):
    import bench.run as run

    model = Path(exported("tiny-gpt2").directory)
    calls = Calls()

    def worker(strategy, model_dir, *flags):
        calls.log.append(("cold" if "--cold" in flags else "warm", strategy))
        return {"disk_bytes_per_s": 1e9, "first_s": 0.1, "steady_s": 0.1, "peak_rss": 1}

    monkeypatch.setattr(run, "warm", calls.warm)
    monkeypatch.setattr(run, "worker", worker)
    monkeypatch.setattr(run, "judge", lambda records, read_s: None)
    args = types.SimpleNamespace(budgets=["1GiB"], modes=["cold", "warm"], loaders=[2], sequence=8)
    run.bench_model(model, args, tmp_path, types.SimpleNamespace(update=lambda: None))
    measured = [k for k, entry in enumerate(calls.log) if entry != "warm" and entry[1] != "disk"]
    warm_runs = [k for k in measured if calls.log[k][0] == "warm"]
    cold_runs = [k for k in measured if calls.log[k][0] == "cold"]
    assert warm_runs and cold_runs
    assert all(calls.log[k - 1] == "warm" for k in warm_runs), calls.log
    assert all(calls.log[k - 1] != "warm" for k in cold_runs), calls.log


def damon(root: Path, action: str, age: int, aggregation_us: int, state: str) -> None:
    """A kdamond's sysfs tree as the kernel lays it out, with one scheme."""
    kdamond = root / "0"
    scheme = kdamond / "contexts/0/schemes/0"
    (scheme / "access_pattern/age").mkdir(parents=True)
    (kdamond / "contexts/0/monitoring_attrs/intervals").mkdir(parents=True)
    (kdamond / "state").write_text(state + "\n")
    (scheme / "action").write_text(action + "\n")
    (scheme / "access_pattern/age/min").write_text(f"{age}\n")
    (kdamond / "contexts/0/monitoring_attrs/intervals/aggr_us").write_text(f"{aggregation_us}\n")


@pytest.mark.parametrize("action, state, expected", [
    ("pageout", "on", "DAMON pageout after 60 s unused"),
    ("pageout", "off", None),  # configured, not running
    ("stat", "on", None),  # monitors only
])
def test_the_machine_line_says_when_the_kernel_reclaims_idle_memory(tmp_path, monkeypatch, action, state, expected):
    import bench.machine as machine

    damon(tmp_path, action, age=12, aggregation_us=5_000_000, state=state)
    monkeypatch.setattr(machine, "DAMON", tmp_path)
    assert machine.proactive_reclaim() == expected
    assert (f"kernel reclaims idle memory ({expected})" in machine.describe()) == (expected is not None)


def test_no_damon_means_no_reclaim_said(tmp_path, monkeypatch):
    import bench.machine as machine

    monkeypatch.setattr(machine, "DAMON", tmp_path / "absent")
    assert machine.proactive_reclaim() is None and "reclaims" not in machine.describe()
