"""`hermes batched`: writes a model's batched layout (format/batched_layout.py reads it): each shared
template's matrices that every use reads as the B of a rewritable MatMul or Gemm, transposed, the rest of
its weights copied, so a batched stage maps only its layout file."""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from ..format.batched_layout import ALIGN, INDEX_NAME, LAYOUT_DIR, BatchedLayout, Placed, load_layout
from ..format.manifest import FileSpec, Manifest, sha256_of
from ..format.page_cache import recache
from ..graphs.transposed import transposable


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
