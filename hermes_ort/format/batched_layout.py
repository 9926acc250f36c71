"""`hermes batched DIR`: the model's streamed matrices written a second time, transposed, for batched decoding.

Why and which matrices: graphs/transposed.py. DIR/batched/ holds one data file per source data file, each
matrix [N, K] at a 64 KiB-aligned offset, and index.json: the source files' sha256 (the layout is stale, and
not used, once a source changes), where each stage's transposed weights lie, and every file's sha256 (checked
on first load, as the manifest's files are). It is derived data: `--remove` deletes it, `hermes update`
leaves it behind with the old version. Costs the streamed matrices' bytes again on disk; no more memory.
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
import onnx

from ..errors import HermesError
from ..graphs.transposed import transposable
from .manifest import FileSpec, Manifest, sha256_of
from .page_cache import recache

LAYOUT_DIR = "batched"
INDEX_NAME = "index.json"
ALIGN = 64 << 10


@dataclass(frozen=True)
class BatchedLayout:
    """What a batched plan maps instead: by stage, (input name, location, offset, length, shape) of each
    transposed weight, and the layout's files."""

    stages: dict[str, tuple[tuple[str, str, int, int, tuple[int, ...]], ...]]
    files: tuple[FileSpec, ...]

    def names(self, stage: str) -> list[str]:
        return [entry[0] for entry in self.stages.get(stage, ())]


def transposed_inputs(templates) -> dict[str, list[str]]:
    """By template key: the weight inputs its batched form takes transposed (only shared templates stream)."""
    found = {}
    for form in templates.forms.values():
        if form.key not in found and not form.looks_up_only:
            found[form.key] = transposable(onnx.load_from_string(form.model),
                                           {w.input_name: w.shape for w in form.weights if not w.looked_up})
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
            refs = [w for w in form.weights if w.input_name in chosen.get(form.key, ())]
            stages[name] = tuple(write_transposed(directory, tmp, w, ends) for w in refs)
        files = tuple(FileSpec(f"{LAYOUT_DIR}/{p.name}", p.stat().st_size, sha256_of(p)) for p in sorted(tmp.glob("*.data")))
        for p in tmp.glob("*.data"):
            recache(p)  # synced there
        sources = {f.path: f.sha256 for s in manifest.stages for f in s.weights}
        index = {"format": 1, "sources": sources, "files": [dataclasses.asdict(f) for f in files],
                 "stages": {k: [list(e[:4]) + [list(e[4])] for e in v] for k, v in stages.items() if v}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        shutil.rmtree(directory / LAYOUT_DIR, ignore_errors=True)
        os.rename(tmp, directory / LAYOUT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_layout(directory, manifest)


def write_transposed(directory: Path, out: Path, w, ends: dict[str, int]):
    """Appends weight w transposed to its layout file; returns its index entry."""
    name = w.location.replace("/", "_")
    offset = -(-ends.get(name, 0) // ALIGN) * ALIGN
    with open(directory / w.location, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        matrix = np.frombuffer(m, np.uint8, w.length, w.offset).view(w.dtype).reshape(w.shape)
        data = np.ascontiguousarray(matrix.T)
        del matrix
    with open(out / name, "r+b" if (out / name).exists() else "wb") as f:
        f.seek(offset)
        f.write(data.tobytes())
    ends[name] = offset + data.nbytes
    return w.input_name, f"{LAYOUT_DIR}/{name}", offset, data.nbytes, tuple(data.shape)


def load_layout(directory: Path, manifest: Manifest) -> BatchedLayout | None:
    """The layout when DIR/batched/ is there and made from these weight files; None (with a warning when
    it is stale) otherwise."""
    path = Path(directory) / LAYOUT_DIR / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        stages = {k: tuple((e[0], e[1], int(e[2]), int(e[3]), tuple(e[4])) for e in v) for k, v in index["stages"].items()}
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
