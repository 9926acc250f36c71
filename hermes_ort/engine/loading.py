"""What a loading agent does for one stage: read its bytes from disk ahead of use, then make it runnable.

ORT maps external data instead of reading it, so creating a session alone reads nothing: the disk read
would happen as page faults inside the first run(). readahead(2) only starts that read (it returned in
1.5 ms for a cold 48 MB block whose read then took 33 ms). A populated mapping (page_cache.py) returns
once every page is in memory, copying nothing into the process; closing it right away leaves the pages
in the page cache, where ORT's own mapping finds them.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path

from ..errors import StageError
from ..format.manifest import StageSpec
from ..format.page_cache import bring_in
from .sessions import SessionConfig, open_stage
from .persistent import PersistentSessions
from .prepared import MappedWeights, OwnedStage, TemplateStage, read_spans
from .templates import Templates, WeightRef

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def read_ahead(path: Path, start: int = 0, length: int | None = None, huge: bool = True) -> None:
    """Bring bytes [start, start + length) of a file (all of it by default) into the page cache and
    return when they are there (what comes from disk in huge pages, unless `huge` is False)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        length = size - start if length is None else length
        if length <= 0:
            return
        if _POPULATE:
            bring_in(f.fileno(), start, length, huge)
            return
        f.seek(start)  # no MAP_POPULATE (not Linux): read through a small buffer
        buffer = bytearray(1 << 22)
        while length > 0 and (n := f.readinto(buffer)):
            length -= n


def prepare(directory: Path, stage: StageSpec, config: SessionConfig, templates: Templates | None = None,
            batched: bool = False, decoding: bool = False, persistent: PersistentSessions | None = None):
    """A stage ready to run. Through a shared template (weights mapped and populated here) when another
    stage shares its graph (`decoding`: whenever it can, Templates.form_for) and it is not prepacked, with
    its matrices transposed when `batched` and the model has a batched layout; else its own session, files
    read ahead first (ORT releases the GIL while it creates it); a prepacked quantized stage, its session
    kept for the process with its pages brought back (`persistent`: persistent.py)."""
    if templates is not None:
        templates.integrity.stage(stage)  # reads the files whole once: also a read-ahead of them
    form = templates.form_for(stage.name, decoding) if templates is not None else None
    if form is not None and config.prepacking and not form.looks_up_only:  # lookups have nothing to prepack
        form = None
    if form is None:
        quantized = templates is not None and templates.canonical[stage.name].quantized
        if persistent is not None and quantized and config.prepacking:
            kept = persistent.acquire(directory, stage, quick_to_create(config, stage, templates))
            if kept is not None:
                return kept
        if templates is not None:  # just the span its weights occupy (a head part: its rows of wte)
            for location, (start, end) in read_spans(templates.canonical[stage.name].weights).items():
                read_ahead(directory / location, start, end - start, location not in templates.tables)
        else:
            for file in stage.weights:
                read_ahead(directory / file.path)
        return OwnedStage(stage, open_stage(directory, stage, quick_to_create(config, stage, templates)))
    refs, transposed = in_layout(stage, form.weights, templates) if batched else (form.weights, ())
    try:
        weights = MappedWeights(directory, refs, templates.tables)
    except (OSError, ValueError) as e:  # a missing or truncated data file
        raise StageError(f"{stage.describe()}: cannot map its weights: {e}") from e
    one_row = templates.session(form, config, transposed, one_row=True) if transposed else None
    return TemplateStage(stage, form, templates.session(form, config, transposed), weights, batched,
                         steps_only=stage.name not in templates.forms, one_row=one_row)


def in_layout(stage: StageSpec, weights: tuple[WeightRef, ...], templates: Templates):
    """(weights to map, the inputs taken transposed): the batched layout's places for the stage's matrices
    (their files checked on first load), or the stage's own weights where it has none."""
    layout = templates.batched()
    placed = {p.input_name: p for p in layout.stages.get(stage.name, ())} if layout is not None else {}
    if not placed:
        return weights, ()
    files = {p.location for p in placed.values()}
    templates.integrity.stage(stage, tuple(f for f in layout.files if f.path in files), "batched/index.json")
    refs = tuple(dataclasses.replace(w, location=p.location, offset=p.offset, length=p.length, shape=p.shape)
                 if (p := placed.get(w.input_name)) else w for w in weights)
    return refs, tuple(w.input_name for w in weights if w.input_name in placed and placed[w.input_name].transposed)


def quick_to_create(config: SessionConfig, stage: StageSpec, templates: Templates | None) -> SessionConfig:
    """Quantized stages get ORT's basic graph optimizations only: a streamed one pays session creation on
    every load, and the extended fusions cost it 4-20 ms there (SmolLM2 native block: 15-40 -> 11.5 ms;
    GPT-2 medium 4-bit block: 20-44 -> 16 ms) while its one-token run measured the same (0.78 ms; 2.3 against
    3.0 ms). fp32 stages keep every optimization: they are created once as templates or kept resident."""
    if templates is None or not templates.canonical[stage.name].quantized or config.optimization != "all":
        return config
    return dataclasses.replace(config, optimization="basic")


def evict(directory: Path, stage: StageSpec) -> None:
    """Drop the stage's files from the page cache, for cold measurements."""
    for file in stage.files:
        fd = os.open(directory / file.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
