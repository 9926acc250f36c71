"""python -m bench.serve MODEL_DIR --budget 25% [--concurrency 1,2,4,8] [--requests-per-client 4]
[--prompt 32] [--tokens 32] [--out DIR]: `hermes serve` on 127.0.0.1 (an ephemeral port, started and stopped
here), driven by N concurrent clients over streamed /v1/completions with random token-id prompts (greedy).
Per concurrency: vLLM's serving metrics (TTFT, TPOT, ITL, end-to-end latency: mean, median, p99; requests/s,
output tokens/s, failed), and from the server's /metrics the bytes its passes streamed per generated token
and its peak RSS. Every level runs a bounded number of requests under a time limit. The batched layout
(`hermes batched`: the template matrices transposed, which steps of several rows read) is written first
when missing, as bench.generate does.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from hermes_ort.engine.memory import format_bytes
from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning.report import table
from hermes_ort.serve.launch import launch

from .generate import batched_layout
from .machine import describe

LIMIT_S = 600  # per concurrency level


def start(model: str, budget: str, parallel: int, context: int):
    env = {k: v for k, v in os.environ.items() if k != "HERMES_API_KEY"}
    return launch(model, "--budget", budget, "--parallel", str(parallel), "--context", str(context), env=env)


def metrics(port: int) -> dict[str, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("hermes_")}


def one_request(port: int, prompt: list[int], tokens: int) -> dict:
    """Streams one completion; the times of its first and every later chunk."""
    import httpx

    start, stamps, usage = time.perf_counter(), [], None
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                return {"failed": True}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk.get("choices"):
                    stamps.append(time.perf_counter() - start)
    except httpx.HTTPError:
        return {"failed": True}
    n = (usage or {}).get("completion_tokens", 0)
    end = time.perf_counter() - start
    return {"failed": not stamps or not n, "ttft": stamps[0] if stamps else None, "e2e": end, "tokens": n,
            "tpot": (end - stamps[0]) / (n - 1) if stamps and n > 1 else None, "itl": list(np.diff(stamps))}


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.array(values) * 1000
    return f"{a.mean():.0f} / {np.median(a):.0f} / {np.percentile(a, 99):.0f}"


def level(port: int, concurrency: int, per_client: int, prompt: int, tokens: int, vocab: int) -> dict:
    rng = np.random.default_rng(concurrency)
    prompts = [rng.integers(1, vocab, prompt).tolist() for _ in range(concurrency * per_client)]
    before, start = metrics(port), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(port, p, tokens), prompts, timeout=LIMIT_S))
    wall, after = time.perf_counter() - start, metrics(port)
    ok = [r for r in results if not r["failed"]]
    generated = after["hermes_generated_tokens_total"] - before["hermes_generated_tokens_total"]
    streamed = after["hermes_streamed_bytes_total"] - before["hermes_streamed_bytes_total"]
    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_ms": summary([r["ttft"] for r in ok]), "tpot_ms": summary([r["tpot"] for r in ok if r["tpot"]]),
            "itl_ms": summary([x for r in ok for x in r["itl"]]), "e2e_ms": summary([r["e2e"] for r in ok]),
            "streamed_bytes_per_token": streamed / max(generated, 1), "peak_rss": after["hermes_peak_rss_bytes"],
            "budget": after["hermes_budget_bytes"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", help="directory for serve.json and serve.md")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    config = json.loads((Path(args.model_dir) / "manifest.json").read_text())["config"]
    batched_layout(Path(args.model_dir), manifest_io.load(args.model_dir))
    proc, port = start(args.model_dir, args.budget, max(levels), args.prompt + args.tokens)
    try:
        rows = [level(port, c, args.requests_per_client, args.prompt, args.tokens, config.get("vocab_size", 1000))
                for c in levels]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    one = rows[0]
    header = ["concurrency", "requests", "failed", "req/s", "output tok/s", "vs c=1", "TTFT ms mean/med/p99",
              "TPOT ms", "ITL ms", "E2E ms", "streamed per token", "vs c=1 ", "peak RSS", "in budget"]
    lines = [[str(r["concurrency"]), str(r["requests"]), str(r["failed"]), f"{r['requests_per_s']:.2f}",
              f"{r['output_tokens_per_s']:.1f}", f"{r['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x",
              r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"], format_bytes(r["streamed_bytes_per_token"]),
              f"{r['streamed_bytes_per_token'] / max(one['streamed_bytes_per_token'], 1):.2f}x",
              format_bytes(r["peak_rss"]), "yes" if not r["budget"] or r["peak_rss"] <= r["budget"] else "NO"]
             for r in rows]
    command = "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"`{command}` on {describe()}\n\nprompt {args.prompt} random token ids, {args.tokens} new (greedy), "
            f"budget {args.budget}\n\n" + table(header, lines))
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "serve.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        (Path(args.out) / "serve.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
