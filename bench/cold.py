"""python -m bench.generate MODEL_DIR... --cold-every-token [--budgets 25%] [--tokens 16]: decoding as a board
whose RAM is the budget sees it. Every streamed stage's files (and its saved pack's) leave the page cache after
its use (posix_fadvise DONTNEED), so every token reads them from storage again. Per model and budget: tokens/s,
bytes read from storage per token (the process's /proc/self/io read_bytes over the decode), the disk's cold
sequential bandwidth measured in the same run, and the floor those bytes set (bytes / bandwidth). Give an fp32
and a quantized conversion of one model at the same budget to see what the smaller bytes buy.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hermes_ort.engine.memory import format_bytes, parse_budget, peak_rss
from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning.profiler import disk_bandwidth
from hermes_ort.planning.report import table

from . import results
from .machine import describe


def storage_reads() -> int:
    """Bytes this process has made the block layer read (not page-cache hits)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def worker(directory: Path, budget: int, tokens: int) -> dict:
    """Decoding at the budget with every streamed stage made cold after its use; one row."""
    from hermes_ort import InferenceSession
    from hermes_ort.generation.decode_plan import Workload

    from .generate import PROMPT, decode

    manifest = manifest_io.load(directory)
    session = InferenceSession(directory, memory_budget=budget)
    plan = session.generation_plan(Workload(1, PROMPT, PROMPT + tokens))
    session._resident.cold = True
    with session.engine(plan) as engine:
        stamps, _ = decode(engine, manifest, 1, 1)  # prefill and the first pass: not counted
        before, start = storage_reads(), time.perf_counter()
        stamps, _ = decode(engine, manifest, 1, tokens)
        elapsed, read = time.perf_counter() - start, storage_reads() - before
    session.close()
    return {"rate": (tokens - 1) / max(stamps[-1] - stamps[0], 1e-9), "read_per_token": read / max(tokens, 1),
            "decode_s": elapsed, "peak": peak_rss(), "streamed": len(manifest.stages) - len(plan.resident)}


def run(model_dirs: list[Path], budgets: list[str], tokens: int, out: Path | None) -> None:
    rows, records = [], []
    for directory in model_dirs:
        manifest = manifest_io.load(directory)
        bandwidth = disk_bandwidth(directory, manifest)
        for budget in budgets:
            limit = parse_budget(budget, manifest.bytes)
            cmd = [sys.executable, "-m", "bench.cold", str(directory), str(limit), str(tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if done.returncode != 0:
                print(f"bench: {directory.name} at {budget}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            floor = bandwidth / r["read_per_token"] if r["read_per_token"] else float("inf")
            records.append({"model": directory.name, "precision": manifest.extra.get("precision", "fp32"),
                            "budget": budget, "budget_bytes": limit, "disk_bytes_per_s": bandwidth, **r,
                            "floor_tokens_per_s": floor})
            rows.append([directory.name, str(manifest.extra.get("precision", "fp32")), f"{budget} "
                         f"({format_bytes(limit)})", str(r["streamed"]), f"{r['rate']:.2f}",
                         format_bytes(r["read_per_token"]), f"{bandwidth / 1e9:.2f} GB/s",
                         f"{floor:.2f}" if np.isfinite(floor) else "-", format_bytes(r["peak"]),
                         "yes" if r["peak"] <= limit else "NO"])
    header = ["model", "precision", "budget", "streamed stages", "tokens/s", "read from disk per token",
              "disk (cold sequential)", "floor tokens/s", "peak RSS", "in budget"]
    print(f"greedy decoding, every streamed stage cold at each use; {describe()}")
    print(table(header, rows))
    written = results.save("generate-cold", results.results_dir(out), records,
                           [results.Table("decoding from storage: streamed files dropped from the page cache after "
                                          "each use", header, rows)], results.machine())
    print(f"\nkept: {', '.join(map(str, written))}")


if __name__ == "__main__":  # the worker: MODEL_DIR BUDGET_BYTES TOKENS
    print(json.dumps(worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
