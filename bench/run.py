"""python -m bench.run [MODEL_DIR...] [--budgets 25%,50%,100%] [--loaders 1,2,3] [--quick] [--cold|--warm]
[--out DIR]: every strategy, cold and warm, each in a fresh process; prints the tables and keeps them (JSON,
Markdown, plots, a trace of one hermes run) in bench/results/<date>-<host>/. Ratios are measured inside one
run (these machines vary +-30% between runs).

floor (cold) = max(whole-model steady run, model bytes / disk bandwidth measured in this run)
floor (warm) = whole-model steady run
The paper's comparison: hermes against pipeswitch (pipelined loading that never frees), speedup and memory
saved, beside PipeLoad's own 4.24x / 86.7% (BERT, ViT) and 2.58x / 90.3% (GPT-style).
--quick: tiny models exported here (seeded random weights), small sequence: the whole runner in minutes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from hermes_ort.engine.memory import format_bytes, parse_budget
from hermes_ort.format import manifest as manifest_io
from hermes_ort.format.manifest import weights_note
from hermes_ort.format.warm import warm
from hermes_ort.planning.report import table

from . import results
from .machine import describe
from .strategies import prepare_whole

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("whole", "sequential", "pipeswitch")  # they do not read the budget: measured once per mode
PAPER = {"bert": (4.24, 0.867), "vit": (4.24, 0.867)}  # PipeLoad's speedup and memory saved vs PipeSwitch
PAPER_GPT = (2.58, 0.903)  # GPT-style models
QUICK_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-vit")


def worker(strategy: str, model_dir: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "bench.worker", strategy, str(model_dir), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_diff(a: Path, b: Path) -> float:
    x, y = np.load(a), np.load(b)
    return max(float(np.max(np.abs(x[k] - y[k]))) for k in x.files)


def runs_of(budgets: list[str], modes: list[str], loaders: list[int]) -> list[tuple[str, str, str | None, int | None]]:
    """(strategy, mode, budget, loaders) in the order they run: baselines once per mode, hermes at every
    budget, then the loading-agent sweep (warm, first budget)."""
    runs = [(s, mode, None, None) for mode in modes for s in BASELINES]
    runs += [("hermes", mode, b, None) for mode in modes for b in budgets]
    return runs + [("hermes", modes[-1], budgets[0], n) for n in loaders]


def bench_model(model_dir: Path, args, scratch: Path, bar) -> tuple[list[dict], float]:
    manifest = manifest_io.load(model_dir)
    prepare_whole(model_dir, manifest)
    disk = worker("disk", model_dir)["disk_bytes_per_s"]
    records = []
    for strategy, mode, budget, loaders in runs_of(args.budgets, args.modes, args.loaders):
        if mode == "warm":  # right before each run: the kernel may reclaim idle files (machine.proactive_reclaim)
            warm(model_dir, manifest)
        limit = parse_budget(budget, manifest.bytes) if budget else 0
        save = scratch / f"{model_dir.name}-{len(records)}.npz"
        flags = ["--budget", str(limit), "--sequence", str(args.sequence), "--save", str(save),
                 *(["--cold"] if mode == "cold" else []), *(["--loaders", str(loaders)] if loaders else [])]
        r = worker(strategy, model_dir, *flags)
        records.append({"model": model_dir.name, "family": manifest.family, "random_weights": bool(
            weights_note(manifest)), "bytes": manifest.bytes, "strategy": strategy, "mode": mode, "budget": budget,
            "budget_bytes": limit or None, "loaders": loaders, "sequence": args.sequence, **r, "save": str(save)})
        bar.update()
    judge(records, manifest.bytes / disk)
    print(f"# {model_dir.name}{weights_note(manifest)}: {format_bytes(manifest.bytes)} on disk, disk "
          f"{disk / 1e9:.2f} GB/s, whole-model steady run {records[0]['steady_s']:.3f} s", file=sys.stderr)
    return records, disk


def judge(records: list[dict], read_s: float) -> None:
    """Adds to each record its ratios to the floor and to whole-model ORT, whether it kept its budget, and
    its largest difference from the sequential chain's outputs."""
    steady = next(r["steady_s"] for r in records if r["strategy"] == "whole")
    reference = next(r["save"] for r in records if r["strategy"] == "sequential")
    for r in records:
        whole = next(w for w in records if w["strategy"] == "whole" and w["mode"] == r["mode"])
        r["floor_s"] = max(steady, read_s) if r["mode"] == "cold" else steady
        r["vs_floor"] = r["first_s"] / r["floor_s"]
        r["speedup_vs_whole"] = whole["first_s"] / r["first_s"]
        r["in_budget"] = r["peak_rss"] <= r["budget_bytes"] if r["budget_bytes"] else None
        r["max_diff"] = max_diff(Path(r.pop("save")), Path(reference))


def main_table(records: list[dict]) -> results.Table:
    rows = [[r["model"], r["strategy"], r["mode"], format_bytes(r["budget_bytes"]) if r["budget_bytes"] else "-",
             str(r["loaders"] or "plan") if r["strategy"] == "hermes" else "-", f"{r['first_s']:.3f}",
             f"{r['vs_floor']:.2f}x", f"{r['speedup_vs_whole']:.2f}x", format_bytes(r["peak_rss"]),
             {True: "yes", False: "NO", None: "-"}[r["in_budget"]], f"{r['max_diff']:.1e}"] for r in records]
    return results.Table("single pass: latency = session creation + first run, each in a fresh process",
                         ["model", "strategy", "mode", "budget", "loaders", "latency s", "vs floor",
                          "speedup vs whole", "peak RSS", "in budget", "max diff"], rows)


def paper_table(records: list[dict]) -> results.Table:
    """Hermes (planner's loaders) against pipeswitch per model, mode and budget, beside the paper's figures."""
    rows = []
    for h in [r for r in records if r["strategy"] == "hermes" and r["loaders"] is None]:
        p = next(r for r in records if r["strategy"] == "pipeswitch" and r["model"] == h["model"]
                 and r["mode"] == h["mode"])
        speedup, paper = p["first_s"] / h["first_s"], PAPER.get(h["family"], PAPER_GPT)
        rows.append([h["model"], h["mode"], format_bytes(h["budget_bytes"]), f"{speedup:.2f}x",
                     f"{1 - h['peak_rss'] / p['peak_rss']:.1%}", f"{paper[0]:.2f}x / {paper[1]:.1%}"])
    return results.Table("the paper's comparison: hermes vs PipeSwitch-style pipelined loading",
                         ["model", "mode", "budget", "speedup", "memory saved", "paper (speedup / saved)"], rows)


def quick_models(scratch: Path) -> list[Path]:
    from hermes_ort_export.build import export_model

    return [export_model(name, scratch / name, random_weights=True, progress=False).directory
            for name in QUICK_MODELS]


def trace_one_run(model_dir: Path, budget: str, sequence: int, out: Path) -> Path:
    """A Chrome/Perfetto trace of one hermes run: a row per thread, a span per load, run and destroy."""
    path = out / f"trace-{model_dir.name}.json"
    subprocess.run([sys.executable, "-m", "hermes_ort", "run", str(model_dir), "--budget", budget, "--sequence",
                    str(sequence), "--trace", str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dirs", nargs="*", type=Path)
    p.add_argument("--budgets", "--budget", default=None, help="comma-separated peak RSS budgets: sizes or shares "
                   "of the model's bytes (default 25%%; --quick: 512MiB,1GiB)")
    p.add_argument("--loaders", default="", help="also sweep hermes over these loading-agent counts (warm)")
    p.add_argument("--sequence", type=int, default=None, help="default 128; --quick: 16")
    p.add_argument("--quick", action="store_true", help="tiny models exported here, end to end in minutes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cold", dest="modes", action="store_const", const=["cold"], help="cold page cache only")
    mode.add_argument("--warm", dest="modes", action="store_const", const=["warm"], help="warm page cache only")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<host>)")
    args = p.parse_args(argv)
    if not args.model_dirs and not args.quick:
        p.error("give MODEL_DIRs, or --quick")
    args.budgets = (args.budgets or ("512MiB,1GiB" if args.quick else "25%")).split(",")
    args.loaders = [int(n) for n in args.loaders.split(",") if n] or ([1, 2] if args.quick else [])
    args.sequence = args.sequence or (16 if args.quick else 128)
    args.modes = args.modes or ["cold", "warm"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = results.results_dir(args.out)
    records, disks = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        models = args.model_dirs or quick_models(Path(scratch))
        with results.progress(len(models) * len(runs_of(args.budgets, args.modes, args.loaders))) as bar:
            for model_dir in models:
                found, disks[model_dir.name] = bench_model(model_dir, args, Path(scratch), bar)
                records += found
        trace = trace_one_run(models[0], args.budgets[0], args.sequence, out)
    tables = [main_table(records), paper_table(records)]
    print(f"{describe()}, batch 1, sequence {args.sequence} (ViT 224x224)")
    for t in tables:
        print(f"\n{t.title}\n{table(t.header, t.rows)}")
    written = results.save("run", out, records, tables, results.machine(disks))
    print(f"\nkept: {', '.join(str(p) for p in [*written, trace])}")


if __name__ == "__main__":
    main()
