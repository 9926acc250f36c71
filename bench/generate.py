"""python -m bench.generate MODEL_DIR [--budget 25%] [--tokens 32]: greedy decoding, whole-model ORT vs hermes
at the budget, each in a fresh process; prints one table (time to first token, tokens/s after it, peak RSS)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hermes_ort import manifest as manifest_io
from hermes_ort.generate import CacheLayout, step_feed
from hermes_ort.memory import format_bytes, parse_budget, peak_rss
from hermes_ort.report import table

from .strategies import prepare_whole

PROMPT = np.arange(1, 33, dtype=np.int64)[None, :]  # 32 prompt tokens


class WholeModel:
    """The merged whole-model graph behind the two calls generate() makes of a session."""

    def __init__(self, directory: Path):
        self.manifest = manifest_io.load(directory)
        self.session = ort.InferenceSession(str(directory / "whole_model.onnx"), providers=["CPUExecutionProvider"])

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feed):
        return self.session.run(names, feed)


def decode(session, tokens: int) -> tuple[float, float]:
    """Greedy decoding with a per-step clock: (first token s, tokens/s after it)."""
    layout, names = CacheLayout.of(session.manifest), [o.name for o in session.get_outputs()]
    ids, past, step, stamps = PROMPT, layout.empty(1), PROMPT, [time.perf_counter()]
    for _ in range(tokens):
        out = dict(zip(names, session.run(None, step_feed(step, past, ids.shape[1] - step.shape[1]))))
        step = out["logits"][:, -1].argmax(-1)[:, None]
        ids = np.concatenate([ids, step], axis=1)
        past = {p: out[q] for p, q in layout.present_for.items()}
        stamps.append(time.perf_counter())
    return stamps[1] - stamps[0], (tokens - 1) / (stamps[-1] - stamps[1])


def worker(strategy: str, directory: Path, budget: int, tokens: int) -> None:
    from hermes_ort import InferenceSession

    start = time.perf_counter()
    session = WholeModel(directory) if strategy == "whole" else InferenceSession(directory, memory_budget=budget)
    created = time.perf_counter() - start
    first, rate = decode(session, tokens)
    print(json.dumps({"first": created + first, "rate": rate, "peak": peak_rss()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", default="25%")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--worker", choices=["whole", "hermes"], help=argparse.SUPPRESS)
    args = p.parse_args()
    manifest = manifest_io.load(args.model_dir)
    budget = parse_budget(args.budget, manifest.bytes)
    if args.worker:
        return worker(args.worker, args.model_dir, budget, args.tokens)
    prepare_whole(args.model_dir, manifest)
    rows = []
    for strategy in ("whole", "hermes"):
        cmd = [sys.executable, "-m", "bench.generate", str(args.model_dir), "--budget", args.budget, "--tokens",
               str(args.tokens), "--worker", strategy]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([args.model_dir.name, strategy, f"{r['first']:.2f}", f"{r['rate']:.2f}", format_bytes(r["peak"])])
    print(f"greedy decoding, prompt 32 tokens, {args.tokens} new, budget {format_bytes(budget)} (warm page cache)")
    print(table(["model", "strategy", "first token s (incl. load)", "tokens/s after", "peak RSS"], rows))


if __name__ == "__main__":
    main()
