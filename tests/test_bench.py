"""The benchmark programs behind the README's tables run end to end on tiny models (no timing asserted)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(module, *args):
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows(text, first_cell):
    return [line.split() for line in text.splitlines() if line.split()[:1] == [first_cell]]


def test_bench_run_prints_every_strategy_cold_and_warm(exported, tmp_path):
    model = tmp_path / "tiny-gpt2"
    shutil.copytree(exported("tiny-gpt2").directory, model)
    table = rows(bench("bench.run", model, "--budget", "2GiB", "--sequence", "8"), "tiny-gpt2")
    assert {(r[1], r[2]) for r in table} == {(s, m) for s in ("whole", "sequential", "pipeswitch", "hermes")
                                             for m in ("cold", "warm")}
    assert all(float(r[-1]) <= 1e-5 for r in table)  # every strategy gives the same outputs
    assert all(r[-2] == "yes" for r in table if r[1] == "hermes")


def test_bench_generate_prints_every_strategy_per_batch(exported, tmp_path):
    model = tmp_path / "tiny-gpt2"
    shutil.copytree(exported("tiny-gpt2").directory, model)
    out = bench("bench.generate", model, "--budgets", "1GiB,2GiB", "--batches", "1,2", "--tokens", "4")
    table = rows(out, "tiny-gpt2")
    strategies = {(r[1], " ".join(r[2:4]) if r[2] == "hermes" else r[2]) for r in table}
    assert strategies == {(b, s) for b in ("1", "2") for s in ("whole-model", "hermes 1GiB", "hermes 2GiB",
                                                               "stream-everything")}
    assert all(r[-1] == "yes" for r in table)  # every strategy decodes the whole model's tokens
    assert all(r[-2] == "yes" for r in table if r[2] == "hermes")  # within the budget
