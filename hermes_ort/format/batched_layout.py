"""`hermes batched DIR`: the model's template matrices written a second time, transposed, for decoding.

Why and which matrices: graphs/transposed.py. DIR/batched/ holds a data file per stage with every weight it
reads in full (matrices [N, K], the rest as they are: a stage maps that file only), each at a 64 KiB-aligned
offset, and index.json: the source files' sha256 (the layout is stale, and
not used, once a source changes), where each stage's transposed weights lie, and every file's sha256 (checked
on first load, as the manifest's files are). It is derived data: `--remove` deletes it, `hermes update`
leaves it behind with the old version. Costs the streamed matrices' bytes again on disk; no more memory.
Write it while no generation runs: loading agents open its files at every load.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HermesError
from ..graphs.transposed import transposable
from .manifest import FileSpec, Manifest, sha256_of
from .page_cache import recache

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


def transposed_inputs(templates) -> dict[str, list[str]]:
    """By template key: the weight inputs its batched form takes transposed (only shared templates stream)."""
    found = {}
    for form in templates.forms.values():
        if form.key not in found and not form.looks_up_only:
            found[form.key] = transposable(form.model, {w.input_name: w.shape for w in form.weights if not w.looked_up})
    return found


def write_layout(directory: Path, manifest: Manifest, templates) -> BatchedLayout:
    """Writes DIR/batched/ whole (a fresh hidden directory renamed into place, files synced and cached in
    huge pages), replacing any older one."""
    directory, chosen = Path(directory), transposed_inputs(templates)
    tmp = directory / f".{LAYOUT_DIR}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stages, ends = {}, {}
        for name, form in templates.forms.items():
            transposed = chosen.get(form.key, ())
            if transposed:
                stages[name] = tuple(write_weight(directory, tmp, name, w, w.input_name in transposed, ends)
                                     for w in form.weights if not w.looked_up)
        files = tuple(FileSpec(f"{LAYOUT_DIR}/{p.name}", p.stat().st_size, sha256_of(p)) for p in sorted(tmp.glob("*.data")))
        for p in tmp.glob("*.data"):
            recache(p)  # synced there
        sources = {f.path: f.sha256 for s in manifest.stages for f in s.weights}
        index = {"format": 1, "sources": sources, "files": [dataclasses.asdict(f) for f in files],
                 "stages": {k: [dataclasses.asdict(e) for e in v] for k, v in stages.items()}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        shutil.rmtree(directory / LAYOUT_DIR, ignore_errors=True)
        os.rename(tmp, directory / LAYOUT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_layout(directory, manifest)


def write_weight(directory: Path, out: Path, stage: str, w, transposed: bool, ends: dict[str, int]) -> Placed:
    """Appends weight w (transposed, or as it is) to the stage's layout file; returns where it lies."""
    name = f"{stage}.data"
    offset = -(-ends.get(name, 0) // ALIGN) * ALIGN
    with open(directory / w.location, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        tensor = np.frombuffer(m, np.uint8, w.length, w.offset).view(w.dtype).reshape(w.shape)
        data = np.array(tensor.T if transposed else tensor, order="C", copy=True)  # not a view of m
        del tensor
    with open(out / name, "r+b" if (out / name).exists() else "wb") as f:
        f.seek(offset)
        f.write(data.tobytes())
    ends[name] = offset + data.nbytes
    return Placed(w.input_name, f"{LAYOUT_DIR}/{name}", offset, data.nbytes, tuple(data.shape), transposed)


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
