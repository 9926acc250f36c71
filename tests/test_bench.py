"""The benchmark programs behind the README's tables run end to end on tiny models (no timing asserted)."""
import json
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


def test_bench_run_quick_keeps_every_figure_tables_plots_and_a_trace(tmp_path):
    """`python -m bench.run --quick`: tiny models exported on the spot, every strategy cold and warm, two
    budgets and the loading-agent sweep, kept as JSON, Markdown, plots and a trace (no timing asserted)."""
    import onnxruntime

    out = bench("bench.run", "--quick", "--out", tmp_path)
    doc = json.loads((tmp_path / "run.json").read_text())
    models = {"tiny-bert", "tiny-gpt2", "tiny-vit"}
    assert doc["kind"] == "run" and doc["command"][-3:] == ["--quick", "--out", str(tmp_path)]
    assert doc["machine"]["cpu"] and doc["machine"]["cores"] >= 1 and doc["machine"]["memory_bytes"] > 0
    assert set(doc["machine"]["disk_bytes_per_s"]) == models and doc["versions"]["onnxruntime"] == onnxruntime.__version__
    records = doc["records"]
    assert {(r["model"], r["strategy"], r["mode"]) for r in records} == {
        (m, s, mode) for m in models for s in ("whole", "sequential", "pipeswitch", "hermes") for mode in ("cold", "warm")}
    assert {(r["model"], r["budget"], r["mode"]) for r in records if r["strategy"] == "hermes" and not r["loaders"]} == {
        (m, b, mode) for m in models for b in ("512MiB", "1GiB") for mode in ("cold", "warm")}
    assert sorted((r["model"], r["loaders"]) for r in records if r["loaders"]) == sorted(
        (m, n) for m in models for n in (1, 2))
    assert all(r["max_diff"] <= 1e-5 for r in records)  # every strategy gives the same outputs
    assert all(r["in_budget"] for r in records if r["strategy"] == "hermes")
    assert all(r["first_s"] > 0 and r["peak_rss"] > 0 and r["vs_floor"] > 0 for r in records)
    markdown = (tmp_path / "run.md").read_text()
    assert "the paper's comparison" in markdown and "4.24x / 86.7%" in markdown and "2.58x / 90.3%" in markdown
    for name in ("latency-vs-budget.png", "peak-rss-vs-budget.png", "latency-vs-loaders.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    spans = {e.get("cat") for e in json.loads((tmp_path / "trace-tiny-bert.json").read_text())["traceEvents"]}
    assert {"load", "run"} <= spans
    assert "kept: " in out


def test_bench_generate_prints_every_strategy_per_batch(exported, tmp_path):
    model = tmp_path / "tiny-gpt2"
    shutil.copytree(exported("tiny-gpt2").directory, model)
    out = bench("bench.generate", model, "--budgets", "1GiB,2GiB", "--batches", "1,2", "--tokens", "4", "--out",
                tmp_path / "results")
    table = rows(out, "tiny-gpt2")
    strategies = {(r[1], " ".join(r[2:4]) if r[2] == "hermes" else r[2]) for r in table}
    assert strategies == {(b, s) for b in ("1", "2") for s in ("whole-model", "hermes 1GiB", "hermes 2GiB",
                                                               "stream-everything")}
    assert all(r[-1] == "yes" for r in table)  # every strategy decodes the whole model's tokens
    assert all(r[-2] == "yes" for r in table if r[2] == "hermes")  # within the budget
    doc = json.loads((tmp_path / "results" / "generate.json").read_text())
    assert len(doc["records"]) == len(table) and all(r["same_tokens"] for r in doc["records"])
    assert {r["precision"] for r in doc["records"]} == {"fp32"} and doc["machine"]["page_cache_bytes_per_s"]
    assert (tmp_path / "results" / "decode-vs-budget.png").read_bytes()[:4] == b"\x89PNG"
    assert (model / "batched" / "index.json").is_file()  # batch 2 read the batched layout, written as it was missing


def test_bench_generate_repeats_shows_the_median_run_and_the_highest_peak(exported, tmp_path):
    """--repeats: every strategy runs in rounds; the table keeps the median run's tokens/s with the range,
    and the highest peak RSS of all runs (a budget holds in every run or it does not hold)."""
    model = tmp_path / "tiny-gpt2"
    shutil.copytree(exported("tiny-gpt2").directory, model)
    out = bench("bench.generate", model, "--budgets", "1GiB", "--batches", "1", "--tokens", "4", "--repeats", "3",
                "--out", tmp_path / "results")
    records = json.loads((tmp_path / "results" / "generate.json").read_text())["records"]
    assert len(records) == 3 and all(len(r["tokens_per_s_runs"]) == len(r["peak_rss_runs"]) == 3 for r in records)
    for r in records:
        assert r["tokens_per_s"] == sorted(r["tokens_per_s_runs"])[1] and r["peak_rss"] == max(r["peak_rss_runs"])
        assert r["same_tokens"]
    hermes = next(r for r in records if r["strategy"] == "hermes")
    whole = next(r for r in records if r["strategy"] == "whole-model ORT")
    assert hermes["vs_whole"] == hermes["tokens_per_s"] / whole["tokens_per_s"]
    low, high = min(hermes["tokens_per_s_runs"]), max(hermes["tokens_per_s_runs"])
    assert f"{hermes['tokens_per_s']:.1f} ({low:.1f}-{high:.1f})" in out


def test_median_run_keeps_the_median_rate_the_highest_peak_and_flags_differing_tokens():
    from bench.generate import median_run

    runs = [{"rate": 3.0, "peak": 10, "tokens": [[1, 2]]}, {"rate": 1.0, "peak": 30, "tokens": [[1, 2]]},
            {"rate": 2.0, "peak": 20, "tokens": [[1, 2]]}]
    combined = median_run(runs)
    assert combined["rate"] == 2.0 and combined["peak"] == 30 and combined["tokens"] == [[1, 2]]
    assert combined["rates"] == [3.0, 1.0, 2.0] and combined["peaks"] == [10, 30, 20]
    assert median_run([*runs[:2], {"rate": 2.0, "peak": 20, "tokens": [[1, 3]]}])["tokens"] is None
    assert median_run([runs[0], None]) is None  # a budget below the feasible minimum is skipped, as with one run


def test_bench_generate_runs_hermes_at_llama_cpps_own_peak(tmp_path, monkeypatch):
    """A GGUF-sourced model gets hermes rows whose budgets are llama.cpp's measured peak RSS and 0.7x it."""
    import types

    import bench.generate as generate

    asked = []

    def run_worker(directory, *args):
        flags = dict(zip(args[::2], args[1::2]))
        asked.append((flags["--worker"], flags["--budget"]))
        peak = 150 << 20 if flags["--worker"] == "llama.cpp" else 1
        return {"first_s": 0.1, "rate": 10.0, "step_s": 0.1, "peak": peak, "streamed_bytes": 0, "tokens": [[1]]}

    monkeypatch.setattr(generate, "warm", lambda directory, manifest: None)
    monkeypatch.setattr(generate, "run_worker", run_worker)
    rows = generate.at_peer_memory(tmp_path, None, ["--batch", "1", "--tokens", "2"])
    assert asked == [("llama.cpp", "0")]
    assert [(name, int(budget)) for name, budget, worker, _ in rows] == [
        ("hermes at llama.cpp's peak RSS", 150 << 20), ("hermes at 0.7x llama.cpp's peak RSS", int(0.7 * (150 << 20)))]
    assert all(worker == "hermes" and arg == budget for _, budget, worker, arg in rows)


def test_bench_generate_cold_every_token_reads_streamed_stages_from_storage(tmp_path):
    """--cold-every-token: one row per model and budget, with the bytes each token read from storage, the
    disk's bandwidth from the same run and the floor they set; streamed stages made cold after each use."""
    import json
    import subprocess
    import sys

    from tiny_gguf import TinyConfig, write_tiny_gguf
    from hermes_ort.convert import convert_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf", TinyConfig(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512))
    model = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model", "native", 0).directory
    from budgets import least_generation_mib

    least = least_generation_mib(model, "--ids", "5,17", "--max-new-tokens", "1")
    out = subprocess.run([sys.executable, "-m", "bench.generate", str(model), "--cold-every-token", "--budgets",
                          f"{least + 4:.1f}MiB",
                          "--tokens", "3", "--out", str(tmp_path / "results")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "read from disk per token" in out.stdout and "floor tokens/s" in out.stdout
    record = json.loads((tmp_path / "results" / "generate-cold.json").read_text())["records"][0]
    assert record["streamed"] > 0 and record["disk_bytes_per_s"] > 0 and record["read_per_token"] >= 0


def test_random_gguf_lays_out_llama_cpp_q4_k_m():
    """Q6_K for the output and for attn_v / ffn_down in the first and last eighth and every third layer
    between; rows that are not a multiple of 256 fall back (Q4_K to Q5_0, Q6_K to Q8_0)."""
    from bench.random_gguf import q4_k_m_type

    assert q4_k_m_type("output.weight", None, 22, 2048, False) == "Q6_K"
    assert q4_k_m_type("token_embd.weight", None, 22, 2048, False) == "Q4_K"
    assert q4_k_m_type("token_embd.weight", None, 30, 576, True) == "Q8_0"
    more = [i for i in range(22) if q4_k_m_type(f"blk.{i}.ffn_down.weight", i, 22, 5632, False) == "Q6_K"]
    assert more == [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]
    assert q4_k_m_type("blk.3.attn_q.weight", 3, 22, 576, False) == "Q5_0"


def test_bench_generate_speculate_measures_plain_beside_each_proposer(tmp_path):
    """--speculate lookup,DRAFT: per prompt, plain decoding and each proposer in the same run, the same
    greedy tokens, passes per token and acceptance kept (no timing asserted)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_gguf import TinyConfig, write_tiny_gguf
    from hermes_ort.convert import convert_gguf

    for name, layers, seed in (("target", 2, 0), ("draft", 1, 3)):
        write_tiny_gguf(tmp_path / f"{name}.gguf", TinyConfig(layers=layers, context=512), seed=seed)
        convert_gguf(tmp_path / f"{name}.gguf", tmp_path / name, "fp32")
    out = bench("bench.generate", tmp_path / "target", "--speculate", f"lookup,{tmp_path / 'draft'}", "--budgets",
                "1GiB", "--tokens", "6", "--out", tmp_path / "results")
    table = rows(out, "target")
    assert len(table) == 12 and all(r[-1] == "yes" for r in table)  # 4 prompts x 3, every one plain's tokens
    doc = json.loads((tmp_path / "results" / "speculate.json").read_text())
    assert {(r["prompt"], r["speculate"]) for r in doc["records"]} == {
        (p, s) for p in ("code edit", "list read back", "summary quoting", "nothing to look up")
        for s in ("plain", "lookup", "draft draft")}
    assert len(doc["records"]) == 12 and all(r["same_tokens"] and r["passes"] <= r["tokens"] for r in doc["records"])
    assert all(r["proposed"] > 0 for r in doc["records"] if r["speculate"] == "draft draft")
