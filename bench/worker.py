"""One strategy, one mode, in this (fresh) process; prints one JSON line. Used by bench/run.py."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from hermes_ort.format import manifest as manifest_io
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.memory import peak_rss

from .strategies import STRATEGIES


def evict_all(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def disk_bandwidth(directory: Path, manifest) -> float:
    """Cold sequential read of every file of the model, bytes per second."""
    evict_all(directory)
    files = sorted({f.path for s in manifest.stages for f in s.files})
    total, buffer, start = 0, bytearray(1 << 23), time.perf_counter()
    for name in files:
        with open(directory / name, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("strategy", choices=[*STRATEGIES, "disk"])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--sequence", type=int, default=128)
    p.add_argument("--save", type=Path)
    p.add_argument("--loaders", type=int, default=0, help="hermes: this many loading agents instead of the plan's")
    args = p.parse_args()
    manifest = manifest_io.load(args.model_dir)
    if args.strategy == "disk":
        print(json.dumps({"disk_bytes_per_s": disk_bandwidth(args.model_dir, manifest)}))
        return
    feed = synthetic_feed(manifest, {"sequence": args.sequence})
    if args.cold:
        evict_all(args.model_dir)
    options = {"loaders": args.loaders} if args.loaders else {}
    outputs, first, steady = STRATEGIES[args.strategy](args.model_dir, manifest, feed, args.budget, **options)
    if args.save:
        np.savez(args.save, **outputs)
    print(json.dumps({"first_s": first, "steady_s": steady, "peak_rss": peak_rss()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
