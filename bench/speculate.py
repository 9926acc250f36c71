"""python -m bench.generate MODEL_DIR... --speculate lookup[,DRAFT_DIR] [--budgets 25%] [--tokens 64]:
greedy decoding with and without speculation, each run in a fresh process, the plain rows measured in
the same run. Prompts whose continuation repeats the prompt (a code edit, a list read back, a summary
quoting its source) and one with nothing to look up (the decode bench's random ids). A model with a
tokenizer.json gets text prompts; one without gets token-id prompts of the same shape (random ids that
are then repeated), whose continuation a random-weights model need not copy. The batched layout (`hermes
batched`) is written first when missing, as bench.generate does: a verify pass feeds several positions,
which read the template matrices transposed (graphs/transposed.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from hermes_ort.engine.memory import format_bytes, parse_budget, peak_rss
from hermes_ort.format import manifest as manifest_io
from hermes_ort.format.warm import warm

from . import results

PLAIN = "plain"
TEXT_PROMPTS = {
    "code edit": ("def total_price(items, tax_rate):\n    total = 0\n    for item in items:\n"
                  "        total += item.price * item.quantity\n    total = total * (1 + tax_rate)\n"
                  "    return round(total, 2)\n\n# The same function with `items` renamed to `cart`:\n"
                  "def total_price(cart, tax_rate):\n"),
    "list read back": ("Shopping list: apples, brown bread, whole milk, six eggs, cheddar cheese, cherry tomatoes, "
                       "basmati rice, ground coffee, olive oil, green tea.\nRead the list back exactly: apples,"),
    "summary quoting": ("The Rhine rises in the Swiss Alps, forms part of the border between Switzerland and "
                        "Germany, flows through the Rhineland and empties into the North Sea in the "
                        "Netherlands.\nQuote the first sentence of the text above word for word: \"The Rhine"),
}
NOTHING_TO_LOOK_UP = "nothing to look up"
KINDS = (*TEXT_PROMPTS, NOTHING_TO_LOOK_UP)


def prompt_ids(directory: Path, manifest, kind: str) -> np.ndarray:
    """[1, S] ids of the prompt `kind` for this model."""
    from .generate import prompt

    vocab = manifest.config.get("vocab_size", 1000)
    if kind == NOTHING_TO_LOOK_UP:
        return prompt(1, vocab)
    if (directory / "tokenizer.json").is_file():
        from hermes_ort.generation.tokenizer import Tokenizer

        return np.array([Tokenizer.from_dir(directory).encode_prompt(TEXT_PROMPTS[kind])], np.int64)
    seed = KINDS.index(kind)
    source = np.random.default_rng(seed).integers(1, vocab, 24)
    return np.concatenate([source, source[:8]])[None].astype(np.int64)  # read back from its start


def worker(directory: Path, budget: int | None, kind: str, speculate: str, draft_tokens: int, tokens: int) -> dict:
    """One generation in this process: tokens/s after the first token, passes, acceptance, peak RSS."""
    from hermes_ort import InferenceSession
    from hermes_ort.generation_api import stream
    from hermes_ort.generation.speculative import SpeculationStats

    manifest = manifest_io.load(directory)
    ids = prompt_ids(directory, manifest, kind)
    stats = SpeculationStats()
    options = {} if speculate == PLAIN else {"speculate": speculate, "draft_tokens": draft_tokens,
                                             "speculation_stats": stats}
    with InferenceSession(directory, memory_budget=budget) as session:
        start, stamps, out = time.perf_counter(), [], []
        for token in stream(session, ids, tokens, **options):
            stamps.append(time.perf_counter() - start)
            out.append(int(token[0]))
        plan = session.last_generation_plan
    passes = stats.passes if speculate != PLAIN else len(out)
    return {"first_s": stamps[0], "rate": (len(out) - 1) / max(stamps[-1] - stamps[0], 1e-9), "passes": passes,
            "proposed": stats.proposed, "accepted": stats.accepted, "peak": peak_rss(), "tokens": out,
            "streamed": len(manifest.stages) - len(plan.resident)}


def run(directories: list[Path], budgets: list[str], speculates: list[str], draft_tokens: int, tokens: int,
        repeats: int, out: Path | None) -> None:
    from .generate import batched_layout, median_run
    from .machine import describe
    from hermes_ort.planning.report import table

    records = []
    with results.progress(len(directories) * len(budgets) * len(KINDS)) as bar:
        for directory in directories:
            manifest = manifest_io.load(directory)
            batched_layout(directory, manifest)
            for budget in budgets:
                for kind in KINDS:
                    strategies = [PLAIN, *speculates]
                    rounds = [[warmed(directory, manifest, budget, kind, s, draft_tokens, tokens) for s in strategies]
                              for _ in range(max(repeats, 1))]
                    runs = [median_run([r[k] for r in rounds]) for k in range(len(strategies))]
                    plain = runs[0]
                    for s, r in zip(strategies, runs):
                        records.append(record(directory, manifest, budget, kind, s, r, plain, tokens))
                    bar.update()
    shown = speculation_table(records)
    print(f"speculative decoding, greedy, {tokens} new tokens, warm page cache; {describe()}")
    print(table(shown.header, shown.rows))
    written = results.save("speculate", results.results_dir(out), records, [shown], results.machine())
    print(f"\nkept: {', '.join(map(str, written))}")


def warmed(directory: Path, manifest, budget: str, kind: str, speculate: str, draft_tokens: int, tokens: int):
    from .generate import run_worker

    warm(directory, manifest)
    return run_worker(str(directory), "--speculate-worker", json.dumps([budget, kind, speculate, draft_tokens]),
                      "--tokens", str(tokens))


def record(directory: Path, manifest, budget: str, kind: str, speculate: str, r: dict, plain: dict,
           tokens: int) -> dict:
    return {"model": directory.name, "budget": budget, "budget_bytes": parse_budget(budget, manifest.bytes),
            "prompt": kind, "speculate": speculate if speculate == PLAIN or speculate == "lookup" else
            f"draft {Path(speculate).name}", "tokens_per_s": r["rate"], "tokens_per_s_runs": r["rates"],
            "first_s": r["first_s"], "passes": r["passes"], "tokens": len(r["tokens"] or []) or tokens,
            "proposed": r["proposed"], "accepted": r["accepted"], "peak_rss": r["peak"],
            "streamed_stages": r["streamed"], "vs_plain": r["rate"] / plain["rate"],
            "same_tokens": r["tokens"] is not None and r["tokens"] == plain["tokens"]}


def speculation_table(records: list[dict]) -> results.Table:
    from .generate import rate_cell

    rows = [[r["model"], f"{r['budget']} ({format_bytes(r['budget_bytes'])})", r["prompt"], r["speculate"],
             f"{r['passes'] / r['tokens']:.2f}", f"{r['accepted']}/{r['proposed']}" if r["proposed"] else "-",
             rate_cell(r), f"{r['vs_plain']:.2f}x", str(r["streamed_stages"]), format_bytes(r["peak_rss"]),
             "yes" if r["same_tokens"] else "NO"] for r in records]
    return results.Table("speculative decoding: passes per token counts the prefill; tokens/s after the first "
                         "token", ["model", "budget", "prompt", "speculate", "passes/token", "accepted",
                                   "tokens/s", "vs plain", "streamed stages", "peak RSS", "same tokens"], rows)
