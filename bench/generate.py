"""python -m bench.generate MODEL_DIR... [--budgets 100%,50%,25%] [--batches 1,8] [--tokens 32] [--repeats 1]
[--speculate lookup,DRAFT_DIR] (the speculative decoding table instead: bench/speculate.py):
greedy decoding with a KV cache, each strategy in a fresh process (peak RSS is a lifetime figure), warm page
cache; with --repeats N every strategy runs N times in rounds and the median run is shown. One table:

whole             whole-model ORT (the stages merged into one graph), default session options, KV cache
hermes            hermes_ort.stream at the budget (the generation plan: decode profile, KV cache inside it;
                  template stages read the transposed layout, `hermes batched`, written if missing)
stream-everything load, run and free every block every token with one block of lookahead (one loader,
                  window 2, a fresh ORT session per stage, nothing resident): what other streaming tools do
floor             max(whole-model step, bytes hermes streams per token / page-cache bandwidth of this run)
llama.cpp         the GGUF file a model directory was converted from, through llama-cpp-python (the `peers`
                  extra), batch 1, all cores: what people run on CPUs today (its own kernels, q8 activations)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hermes_ort.format import manifest as manifest_io
from hermes_ort.generation.decoding import CacheLayout, Decoder, check_prompt
from hermes_ort.engine.loading import read_ahead
from hermes_ort.format.warm import warm
from hermes_ort.engine.memory import format_bytes, parse_budget, peak_rss
from hermes_ort.planning.planner import Plan
from hermes_ort.planning.report import table
from hermes_ort.format.manifest import weights_note

from . import cold, results
from . import speculate as speculate_bench
from .machine import describe
from .strategies import prepare_whole

PROMPT = 32
PEER_SHARES = {"hermes at llama.cpp's peak RSS": 1.0, "hermes at 0.7x llama.cpp's peak RSS": 0.7}


class WholeModel:
    """The merged whole-model graph as the engine a Decoder steps."""

    def __init__(self, directory: Path):
        self.session = ort.InferenceSession(str(directory / "whole_model.onnx"), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feed, decoding=False, sink=None):  # default session.run: what a user of ORT writes
        return dict(zip(self.names, self.session.run(None, feed)))


def prompt(batch: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, vocab, (batch, PROMPT))


def decode(engine, manifest, batch: int, tokens: int) -> tuple[list[float], np.ndarray]:
    """Greedy decoding; (seconds at which each token of every row was known, tokens [B, n])."""
    layout = CacheLayout.of(manifest)
    ids = prompt(batch, manifest.config.get("vocab_size", 1000))
    start, stamps, out = time.perf_counter(), [], []
    decoder = Decoder(engine, layout, *check_prompt(ids, None, tokens, layout), PROMPT + tokens)
    logits = decoder.prefill()
    for n in range(tokens):
        out.append(logits.argmax(-1))
        stamps.append(time.perf_counter() - start)
        if n < tokens - 1:
            logits = decoder.step(out[-1])
    return stamps, np.stack(out, axis=1)


def stream_everything(manifest) -> Plan:
    names = tuple(s.name for s in manifest.stages)
    return Plan(0, loaders=1, window=2, resident=(), prepacked=names, compute_threads=0, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)


def streamed_bytes(session, plan: Plan) -> int:
    """Weight bytes a step maps or reads for the stages the plan streams (embedding tables are looked up)."""
    forms = session._resident.templates.canonical
    return sum(w.length for s in session.manifest.stages if plan.streams(s.name) for w in forms[s.name].weights
               if not w.looked_up)


def gguf_source(manifest) -> Path | None:
    """The GGUF file `hermes convert` read, when it is still there and llama-cpp-python is installed."""
    import importlib.util

    source = Path(str(manifest.extra.get("source", "")))
    return source if source.suffix == ".gguf" and source.is_file() and importlib.util.find_spec("llama_cpp") else None


def llama_cpp_decode(path: Path, manifest, tokens: int) -> tuple[float, list[float], np.ndarray]:
    """(load seconds, stamps, tokens [1, n]): greedy over the same prompt ids, logits read after each eval."""
    import os

    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(str(path), n_ctx=PROMPT + tokens + 8, n_threads=os.cpu_count(), verbose=False)
    created = time.perf_counter() - start
    ids = prompt(1, manifest.config.get("vocab_size", 1000))[0].tolist()
    start, stamps, out = time.perf_counter(), [], []
    llm.eval(ids)
    for n in range(tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        stamps.append(time.perf_counter() - start)
        if n < tokens - 1:
            llm.eval([out[-1]])
    return created, stamps, np.array([out])


def worker(strategy: str, directory: Path, budget: int, batch: int, tokens: int) -> dict:
    from hermes_ort import InferenceSession
    from hermes_ort.generation.decode_plan import Workload

    manifest = manifest_io.load(directory)
    start = time.perf_counter()
    if strategy == "llama.cpp":
        created, stamps, ids = llama_cpp_decode(gguf_source(manifest), manifest, tokens)
        streamed = 0
    elif strategy == "whole":
        engine, created, streamed = WholeModel(directory), time.perf_counter() - start, 0
        stamps, ids = decode(engine, manifest, batch, tokens)
    else:
        override = stream_everything(manifest) if strategy == "stream-everything" else None
        session = InferenceSession(directory, memory_budget=budget, plan_override=override)
        plan = session.generation_plan(Workload(batch, PROMPT, PROMPT + tokens))
        streamed = streamed_bytes(session, plan)
        with session.engine(plan) as engine:
            created = time.perf_counter() - start
            stamps, ids = decode(engine, manifest, batch, tokens)
    steps = np.diff(stamps)
    return {"first_s": created + stamps[0], "rate": batch * len(steps) / steps.sum(), "step_s": float(np.median(steps)),
            "peak": peak_rss(), "streamed_bytes": streamed, "tokens": ids.tolist()}


def page_cache_bandwidth(directory: Path, manifest) -> float:
    """Bytes per second of the loaders' own read (populated 8 MiB mappings, page_cache.py) over every model
    file, warm: the better of two passes. From huge pages this is mapping, not copying: tens of GB/s."""
    files = sorted({f.path for s in manifest.stages for f in s.files})
    total, best = sum((directory / name).stat().st_size for name in files), 0.0
    for _ in range(2):
        start = time.perf_counter()
        for name in files:
            read_ahead(directory / name)
        best = max(best, total / (time.perf_counter() - start))
    return best


def run_worker(*args: str) -> dict | None:
    """The worker's figures; None when the budget is below the model's feasible minimum (said on stderr)."""
    cmd = [sys.executable, "-m", "bench.generate", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0 and ("below the smallest feasible plan" in out.stderr or "below what any input needs"
                                in out.stderr):
        print(f"bench: skipped {' '.join(args)}: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return None
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_run(directory: Path, manifest, *args: str) -> dict | None:
    """run_worker from a page cache warmed right before it (huge pages, as `hermes warm` leaves it): a
    kernel that reclaims idle memory (machine.proactive_reclaim) drops a model's files a minute after their
    last read, so one warm per model left the later workers of a model's table reading from disk."""
    warm(directory, manifest)
    return run_worker(str(directory), *args)


def bench_model(directory: Path, budgets: list[str], batches: list[int], tokens: int, repeats: int,
                bar) -> tuple[list[dict], float]:
    manifest = manifest_io.load(directory)
    prepare_whole(directory, manifest)
    warm(directory, manifest)  # the page cache as hermes leaves it (export, hermes warm): huge pages
    batched_layout(directory, manifest)
    bandwidth = page_cache_bandwidth(directory, manifest)
    records = []
    for batch in batches:
        common = ["--batch", str(batch), "--tokens", str(tokens)]
        strategies = [("whole-model ORT", None, "whole", "0")] + [("hermes", b, "hermes", b) for b in budgets]
        strategies.append(("stream-everything", None, "stream-everything", "0"))
        if batch == 1 and gguf_source(manifest) is not None:
            strategies.append(("llama.cpp (same GGUF)", None, "llama.cpp", "0"))
            strategies += at_peer_memory(directory, manifest, common)
        rounds = [[warm_run(directory, manifest, "--worker", worker, "--budget", b, *common)
                   for _, _, worker, b in strategies] for _ in range(repeats)]
        runs = [(name, budget, median_run([r[k] for r in rounds]))
                for k, (name, budget, _, _) in enumerate(strategies)]
        whole = runs[0][2]
        for name, budget, r in [run for run in runs if run[2] is not None]:
            floor = batch / max(whole["step_s"], r["streamed_bytes"] / bandwidth) if name != "whole-model ORT" else None
            records.append(record(directory.name, manifest, batch, name, budget, r, whole, floor))
        bar.update()
    print(f"# {directory.name}{weights_note(manifest)}: {format_bytes(manifest.bytes)} on disk; page cache "
          f"(populated mappings, huge pages) {bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    return records, bandwidth


def at_peer_memory(directory: Path, manifest, common: list[str]) -> list[tuple[str, str, str, str]]:
    """hermes rows whose budgets are llama.cpp's own peak RSS (and 0.7x it), read from a llama.cpp run made
    here first: the question a board user asks is how fast hermes is in the memory llama.cpp takes."""
    peak = warm_run(directory, manifest, "--worker", "llama.cpp", "--budget", "0", *common)["peak"]
    return [(name, str(int(peak * share)), "hermes", str(int(peak * share))) for name, share in PEER_SHARES.items()]


def batched_layout(directory: Path, manifest) -> None:
    """Decoding reads the template stages' matrices transposed, as after `hermes batched DIR` (written here
    once when the model has none, and said so)."""
    from hermes_ort.engine.templates import Templates
    from hermes_ort.engine.batched_writer import write_layout
    from hermes_ort.format.batched_layout import LAYOUT_DIR, load_layout

    if load_layout(directory, manifest) is None:
        layout = write_layout(directory, manifest, Templates(directory, manifest))
        print(f"# {directory.name}: batched layout written to {directory / LAYOUT_DIR} "
              f"({format_bytes(sum(f.bytes for f in layout.files))}), as `hermes batched` does", file=sys.stderr)


def median_run(runs: list[dict | None]) -> dict | None:
    """One strategy's repeats (taken in rounds, every strategy once per round, so a slow spell of this
    noisy machine hits them all) as one: the run of median tokens/s, with the highest peak RSS of them all
    (a budget holds in every run or it does not hold), every run's rate, and whether they all decoded the
    same tokens."""
    if any(r is None for r in runs):
        return None
    middle = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
    return middle | {"peak": max(r["peak"] for r in runs), "rates": [r["rate"] for r in runs],
                     "peaks": [r["peak"] for r in runs],
                     "tokens": middle["tokens"] if all(r["tokens"] == middle["tokens"] for r in runs) else None}


def record(model, manifest, batch, strategy, budget, r, whole, floor) -> dict:
    limit = parse_budget(budget, manifest.bytes) if budget else None
    return {"model": model, "precision": manifest.extra.get("precision", "fp32"), "random_weights": bool(
        weights_note(manifest)), "bytes": manifest.bytes, "batch": batch, "strategy": strategy, "budget": budget,
        "budget_bytes": limit, "first_s": r["first_s"], "tokens_per_s": r["rate"], "step_s": r["step_s"],
        "peak_rss": r["peak"], "streamed_bytes": r["streamed_bytes"], "vs_whole": r["rate"] / whole["rate"],
        "floor_tokens_per_s": floor, "vs_floor": r["rate"] / floor if floor else None,
        "in_budget": r["peak"] <= limit if limit else None, "tokens_per_s_runs": r["rates"],
        "peak_rss_runs": r["peaks"],
        "same_tokens": r["tokens"] is not None and bool(np.array_equal(np.array(r["tokens"]), np.array(whole["tokens"])))}


def decode_table(records: list[dict]) -> results.Table:
    rows = [[r["model"], str(r["batch"]), f"hermes {r['budget']}" if r["strategy"] == "hermes" else r["strategy"],
             format_bytes(r["budget_bytes"]) if r["budget_bytes"] else "-", f"{r['first_s']:.2f}",
             rate_cell(r), f"{r['vs_whole']:.2f}x", f"{r['vs_floor']:.2f}x" if r["vs_floor"] else "-",
             format_bytes(r["peak_rss"]), {True: "yes", False: "NO", None: "-"}[r["in_budget"]],
             "yes" if r["same_tokens"] else "no"] for r in records]
    return results.Table("greedy decoding: tokens/s counts every row after the first token; first token includes "
                         "creating the session", ["model", "batch", "strategy", "budget", "first token s",
                                                  "tokens/s", "vs whole", "vs floor", "peak RSS", "in budget",
                                                  "same tokens"], rows)


def rate_cell(r: dict) -> str:
    """Tokens/s, with the range over repeats when there were several."""
    runs = r["tokens_per_s_runs"]
    spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
    return f"{r['tokens_per_s']:.1f}{spread}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dirs", nargs="+", type=Path)
    p.add_argument("--budgets", default="100%,50%,25%", help="comma-separated sizes or shares of the model's bytes")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<host>)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every strategy, in rounds; the table shows "
                   "the median run's figures, the range of tokens/s, and the highest peak RSS")
    p.add_argument("--cold-every-token", action="store_true", help="streamed stages read from disk (bench/cold.py)")
    p.add_argument("--speculate", help="comma-separated: lookup and/or draft model directories; the table is "
                   "then speculative decoding against plain decoding on repeating prompts (bench/speculate.py)")
    p.add_argument("--draft-tokens", type=int, default=8, help="with --speculate: the most proposals per pass")
    p.add_argument("--speculate-worker", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["whole", "hermes", "stream-everything", "llama.cpp"], help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.speculate_worker:
        budget, kind, speculate, draft_tokens = json.loads(args.speculate_worker)
        directory = args.model_dirs[0]
        limit = parse_budget(budget, manifest_io.load(directory).bytes)
        print(json.dumps(speculate_bench.worker(directory, limit, kind, speculate, draft_tokens, args.tokens)))
        return
    if args.speculate:
        return speculate_bench.run(args.model_dirs, args.budgets.split(","), args.speculate.split(","),
                                   args.draft_tokens, args.tokens, args.repeats, args.out)
    if args.worker:
        directory = args.model_dirs[0]
        budget = parse_budget(args.budget, manifest_io.load(directory).bytes) if args.budget != "0" else None
        print(json.dumps(worker(args.worker, directory, budget, args.batch, args.tokens)))
        return
    if args.cold_every_token:
        return cold.run(args.model_dirs, args.budgets.split(","), args.tokens, args.out)
    records, bandwidths = [], {}
    batches = [int(b) for b in args.batches.split(",")]
    with results.progress(len(args.model_dirs) * len(batches)) as bar:
        for directory in args.model_dirs:
            found, bandwidths[directory.name] = bench_model(directory, args.budgets.split(","), batches,
                                                            args.tokens, max(args.repeats, 1), bar)
            records += found
    decoded = decode_table(records)
    print(f"greedy decoding, prompt {PROMPT} tokens, {args.tokens} new per row, warm page cache; {describe()}")
    print(table(decoded.header, decoded.rows))
    facts = results.machine() | {"page_cache_bytes_per_s": bandwidths}
    written = results.save("generate", results.results_dir(args.out), records, [decoded], facts)
    print(f"\nkept: {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
