"""python -m bench.run MODEL_DIR... [--budget 25%]: every strategy, cold and warm, each in a fresh process;
prints one table. Ratios are measured inside one run (these machines vary +-30% between runs).

floor (cold) = max(whole-model steady run, model bytes / disk bandwidth measured in this run)
floor (warm) = whole-model steady run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from hermes_ort.format import manifest as manifest_io
from hermes_ort.engine.memory import format_bytes, parse_budget
from hermes_ort.planning.report import table
from hermes_ort.format.manifest import weights_note

from .machine import describe
from .strategies import STRATEGIES, prepare_whole


def worker(strategy: str, model_dir: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "bench.worker", strategy, str(model_dir), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_diff(a: Path, b: Path) -> float:
    x, y = np.load(a), np.load(b)
    return max(float(np.max(np.abs(x[k] - y[k]))) for k in x.files)


def bench_model(model_dir: Path, budget_text: str, sequence: int, scratch: Path) -> list[list[str]]:
    manifest = manifest_io.load(model_dir)
    prepare_whole(model_dir, manifest)
    budget = parse_budget(budget_text, manifest.bytes)
    disk = worker("disk", model_dir)["disk_bytes_per_s"]
    results = {}
    for mode in ("cold", "warm"):
        if mode == "warm":
            worker("disk", model_dir)  # reads every file: the page cache is warm for what follows
        for name in STRATEGIES:
            save = scratch / f"{model_dir.name}-{name}-{mode}.npz"
            flags = ["--budget", str(budget), "--sequence", str(sequence), "--save", str(save)]
            results[name, mode] = (worker(name, model_dir, *flags, *(["--cold"] if mode == "cold" else [])), save)
    steady = results["whole", "warm"][0]["steady_s"]
    floors = {"cold": max(steady, manifest.bytes / disk), "warm": steady}
    reference = results["sequential", "warm"][1]
    rows = []
    for (name, mode), (r, save) in results.items():
        whole_first = results["whole", mode][0]["first_s"]
        rows.append([model_dir.name, name, mode, f"{r['first_s']:.3f}", f"{r['first_s'] / floors[mode]:.2f}x",
                     f"{whole_first / r['first_s']:.2f}x", format_bytes(r["peak_rss"]),
                     "yes" if r["peak_rss"] <= budget else "no", f"{max_diff(save, reference):.1e}"])
    print(f"# {model_dir.name}{weights_note(manifest)}: {format_bytes(manifest.bytes)} on disk, budget {format_bytes(budget)}, disk "
          f"{disk / 1e9:.2f} GB/s, whole-model steady run {steady:.3f} s, floor cold {floors['cold']:.3f} s / "
          f"warm {floors['warm']:.3f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dirs", nargs="+", type=Path)
    p.add_argument("--budget", default="25%", help="peak RSS budget: a size or a share of the model's bytes")
    p.add_argument("--sequence", type=int, default=128)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model_dir in args.model_dirs:
            rows += bench_model(model_dir, args.budget, args.sequence, Path(scratch))
    print(f"{describe()}, batch 1, sequence {args.sequence} (ViT 224x224); latency = "
          "session creation + first run")
    print(table(["model", "strategy", "mode", "latency s", "vs floor", "speedup vs whole", "peak RSS",
                 "in budget", "max diff"], rows))


if __name__ == "__main__":
    main()
