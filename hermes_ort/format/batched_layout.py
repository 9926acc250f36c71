"""`hermes batched DIR`: the model's template matrices written a second time, transposed, for decoding (read here,
written by engine/batched_writer.py).

Why and which matrices: graphs/transposed.py. DIR/batched/ holds a data file per stage with every weight it
reads in full (matrices [N, K], the rest as they are: a stage maps that file only), each at a 64 KiB-aligned
offset, and index.json: the source files' sha256 (the layout is stale, and
not used, once a source changes), where each stage's transposed weights lie, and every file's sha256 (checked
on first load, as the manifest's files are). It is derived data: `--remove` deletes it, `hermes update`
leaves it behind with the old version. Costs the streamed matrices' bytes again on disk; no more memory.
Write it while no generation runs: loading agents open its files at every load.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import HermesError
from .manifest import FileSpec, Manifest

LAYOUT_DIR = "batched"
INDEX_NAME = "index.json"
ALIGN = 64 << 10


@dataclass(frozen=True)
class Placed:
    """One weight of a stage in the layout: its template input, where its bytes lie, and whether they are
    the matrix transposed (else copied as they are, so that a stage maps only its layout file)."""

    input_name: str
    location: str
    offset: int
    length: int
    shape: tuple[int, ...]
    transposed: bool


@dataclass(frozen=True)
class BatchedLayout:
    """What a batched plan maps instead of a stage's own weights, by stage, and the layout's files."""

    stages: dict[str, tuple[Placed, ...]]
    files: tuple[FileSpec, ...]


def load_layout(directory: Path, manifest: Manifest) -> BatchedLayout | None:
    """The layout when DIR/batched/ is there and made from these weight files; None (with a warning when
    it is stale) otherwise."""
    path = Path(directory) / LAYOUT_DIR / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        stages = {k: tuple(Placed(**{**e, "shape": tuple(e["shape"])}) for e in v) for k, v in index["stages"].items()}
        files = tuple(FileSpec(**f) for f in index["files"])
        sources = index["sources"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise HermesError(f"{path} is corrupt ({type(e).__name__}: {e}): run `hermes batched {directory}` again") from e
    current = {f.path: f.sha256 for s in manifest.stages for f in s.weights}
    if sources != current:
        warnings.warn(f"{Path(directory) / LAYOUT_DIR} was made from other weight files than the model has now: "
                      f"not used; run `hermes batched {directory}` again", stacklevel=2)
        return None
    return BatchedLayout(stages, files)


def remove_layout(directory: Path) -> bool:
    target = Path(directory) / LAYOUT_DIR
    if not target.exists():
        return False
    shutil.rmtree(target)
    return True
