"""Stage ranges on 1 vs 2 Ray nodes of this host (ray.cluster_utils.Cluster: a 0-CPU head for the driver, 1-CPU
nodes), at one stream and with several requests in flight: tokens/s measured against predicted, and the
overhead of one crossing between processes (ms per hop).

    python -m bench.cluster MODEL_DIR [--tokens 16] [--requests 8] [--out DIR]

Each node count runs in a fresh subprocess with a cluster of its own. Predicted: a token at one stream costs
every range's compute in turn (the boards' own compute time, as their actors measured it) plus one hop per
crossing; with k requests in flight the pipeline is bound by its slowest range, so k streams reach at most
min(k / (compute + hops), 1 / slowest range). On one host the "boards" share its cores: what this measures is
the cost of the split, not a second machine's compute.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning.report import table

from . import results
from .machine import describe

PROMPT = 8
STORE = 80 << 20


def split(stages: int, nodes: int) -> list[tuple[int, int]]:
    """Half-open ranges of near-equal stage counts, in order."""
    edges = [round(i * stages / nodes) for i in range(nodes + 1)]
    return list(zip(edges, edges[1:]))


def prompts(count: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, vocab, (1, PROMPT)) for _ in range(count)]


def timed_in_flight(pipeline, batch: list[np.ndarray], tokens: int) -> float:
    """Seconds for every prompt of `batch` to get its tokens, each on a thread of its own."""
    threads = [threading.Thread(target=pipeline.generate, args=(p, tokens)) for p in batch]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def worker(directory: Path, nodes: int, tokens: int, requests: int) -> dict:
    """One cluster of `nodes` boards: one stream, then `requests` in flight."""
    import ray
    from ray.cluster_utils import Cluster

    from hermes_ort.cluster import Pipeline, StageRange
    from hermes_ort.cluster.placement import Placement

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    manifest = manifest_io.load(directory)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": STORE})
    for i in range(nodes):
        cluster.add_node(num_cpus=1, resources={f"board{i}": 1}, object_store_memory=STORE)
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        ranges = split(len(manifest.stages), nodes)
        placement = Placement.given(*((f"board{i}", StageRange(*r)) for i, r in enumerate(ranges)))
        boards = [{"resources": {f"board{i}": 1}} for i in range(nodes)]
        vocab = manifest.config.get("vocab_size", 256)
        with Pipeline(directory, boards, placement, max_in_flight=requests, timeout_s=600) as pipeline:
            pipeline.generate(prompts(1, vocab)[0], 2)  # first runs: sessions created, pages touched
            before = pipeline.stats()
            started = time.perf_counter()
            pipeline.generate(prompts(1, vocab)[0], tokens)
            one = time.perf_counter() - started
            after = pipeline.stats()
            many = timed_in_flight(pipeline, prompts(requests, vocab), tokens)
        compute = {b: (after[b]["compute_s"] - before[b]["compute_s"]) / tokens for b in after}
        crossed = {b: after[b]["last_received"] for b in after}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"nodes": nodes, "ranges": ranges, "tokens": tokens, "requests": requests, "one_stream_s": one,
            "in_flight_s": many, "compute_s_per_token": compute, "bytes_crossing": crossed}


def record(r: dict) -> dict:
    """Measured and predicted tokens/s, and the hop overhead the one-stream time leaves beside compute."""
    compute = sum(r["compute_s_per_token"].values())
    slowest = max(r["compute_s_per_token"].values())
    hops = r["nodes"] + 1  # driver -> first board -> ... -> last board -> driver
    per_token = r["one_stream_s"] / r["tokens"]
    hop_s = max(0.0, per_token - compute) / hops
    predicted_many = min(r["requests"] / (compute + hops * hop_s), 1 / slowest)
    return r | {"one_stream_tokens_s": 1 / per_token,
                "in_flight_tokens_s": r["requests"] * r["tokens"] / r["in_flight_s"],
                "hop_ms": hop_s * 1000, "predicted_in_flight_tokens_s": predicted_many,
                "predicted_one_stream_tokens_s": 1 / (compute + hops * hop_s)}


def cluster_table(records: list[dict]) -> results.Table:
    header = ["nodes", "ranges", "1 stream tok/s", f"{records[0]['requests']} in flight tok/s", "predicted",
              "compute ms/token", "hop ms", "bytes per step crossing"]
    rows = [[str(r["nodes"]), " ".join(f"[{a}, {b})" for a, b in r["ranges"]), f"{r['one_stream_tokens_s']:.1f}",
             f"{r['in_flight_tokens_s']:.1f}", f"{r['predicted_in_flight_tokens_s']:.1f}",
             f"{sum(r['compute_s_per_token'].values()) * 1000:.2f}", f"{r['hop_ms']:.2f}",
             str(sum(sum(c.values()) for c in r["bytes_crossing"].values()))] for r in records]
    return results.Table("stage ranges on Ray nodes of one host", header, rows)


def run_worker(directory: Path, nodes: int, tokens: int, requests: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.cluster", str(directory), "--worker", str(nodes),
                          "--tokens", str(tokens), "--requests", str(requests)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench.cluster: {nodes} node(s) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--requests", type=int, default=8, help="requests in flight at once")
    p.add_argument("--nodes", default="1,2", help="comma-separated node counts")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<host>)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model_dir, args.worker, args.tokens, args.requests)))
        return
    records = [record(run_worker(args.model_dir, int(n), args.tokens, args.requests)) for n in args.nodes.split(",")]
    t = cluster_table(records)
    print(f"greedy decoding, prompt {PROMPT} tokens, {args.tokens} new per request; {describe()}")
    print(table(t.header, t.rows))
    written = results.save("cluster", results.results_dir(args.out), records, [t], results.machine())
    print(f"\nkept: {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
