"""python -m bench.soak MODEL_DIR [--minutes 10 | --runs N --generations M] [--budget 25%]: a long unattended run.

Streamed runs, then (for a decoder) generations, in this one process on one InferenceSession, as a board
would serve them for months. Prints RSS, threads and open file descriptors after the 10th of each and at the
end, and whether they grew: RSS by more than 5%, threads or descriptors by any. Exit status 1 if they did.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import psutil

import hermes_ort
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import format_bytes, peak_rss
from hermes_ort.engine.plan import Plan
from hermes_ort.format.manifest import weights_note
from hermes_ort.generation.decoding import DECODER_INPUTS
from hermes_ort.planning.report import table

from .machine import describe

RSS_GROWTH = 0.05
EVERYTHING_STREAMED = Plan(budget=0, loaders=2, window=2, resident=(), prepacked=(), compute_threads=1,
                           predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)


def state() -> dict:
    me = psutil.Process()
    return {"rss": me.memory_info().rss, "threads": threading.active_count(), "fds": me.num_fds()}


def soak(session, work, count: int | None, seconds: float | None) -> dict:
    """Calls work() `count` times (or for `seconds`); the process's state after the 10th call and the last."""
    seen, n, start = {}, 0, time.perf_counter()
    while (n < count) if count is not None else (n < 10 or time.perf_counter() - start < seconds):
        work()
        n += 1
        if n == 10:
            seen["after 10"] = state()
    seen["at the end"] = state()
    return {"calls": n, "seconds": time.perf_counter() - start, **seen}


def grew(phase: dict) -> list[str]:
    early, late = phase["after 10"], phase["at the end"]
    return ([f"RSS {format_bytes(early['rss'])} -> {format_bytes(late['rss'])}"]
            if late["rss"] > (1 + RSS_GROWTH) * early["rss"] else []) + [
        f"{k} {early[k]} -> {late[k]}" for k in ("threads", "fds") if late[k] > early[k]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("--minutes", type=float, default=10.0, help="split between runs and generations")
    p.add_argument("--runs", type=int, help="a fixed number of streamed runs instead of --minutes")
    p.add_argument("--generations", type=int, help="a fixed number of generations instead of --minutes")
    p.add_argument("--budget", help="plan within this budget (default: stream every stage on every run)")
    p.add_argument("--sequence", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = p.parse_args(argv)
    fixed = args.runs is not None or args.generations is not None
    seconds = None if fixed else args.minutes * 30  # half the time each
    options = {"memory_budget": args.budget} if args.budget else {"plan_override": EVERYTHING_STREAMED}
    phases = {}
    with hermes_ort.InferenceSession(args.model_dir, **options) as session:
        feed = synthetic_feed(session.manifest, {"sequence": args.sequence, "past_sequence": 0})
        outputs = [session.get_outputs()[0].name]
        if not fixed or args.runs:
            phases["streamed runs"] = soak(session, lambda: session.run(outputs, feed), args.runs, seconds)
        names = {t.name for t in session.manifest.inputs}
        if all(n in names for n in DECODER_INPUTS) and (not fixed or args.generations):
            ids = np.random.default_rng(0).integers(1, 100, (1, args.sequence))
            phases["generations"] = soak(session, lambda: hermes_ort.generate(session, ids, 4), args.generations,
                                         seconds)
        model = f"{args.model_dir}{weights_note(session.manifest)}"
    failed = {name: grew(phase) for name, phase in phases.items()}
    if args.json:
        print(json.dumps({"phases": phases, "grew": failed, "peak_rss": peak_rss()}))
    else:
        print(f"# soak of {model}; {describe()}")
        print(table(["phase", "calls", "seconds", "RSS after 10", "RSS at the end", "threads", "fds", "grew"],
                    [[name, str(ph["calls"]), f"{ph['seconds']:.0f}", format_bytes(ph["after 10"]["rss"]),
                      format_bytes(ph["at the end"]["rss"]), f"{ph['after 10']['threads']} -> "
                      f"{ph['at the end']['threads']}", f"{ph['after 10']['fds']} -> {ph['at the end']['fds']}",
                      "; ".join(failed[name]) or "no"] for name, ph in phases.items()]))
        print(f"peak RSS {format_bytes(peak_rss())}")
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
