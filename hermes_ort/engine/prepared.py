"""What a loading agent hands the inference agent: a stage ready to run. A template stage is its weights
mapped (every page present, in huge pages where the page cache has them: format/page_cache.py) and fed to
a session shared by every stage of its graph (templates.py); an owned stage has a session of its own."""
from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import StageError
from ..format.manifest import StageSpec
from ..format.page_cache import HUGE_PAGE, map_populated
from .memory import give_back
from .sessions import run_session, run_stage
from .templates import Canonical, WeightRef


class MappedWeights:
    """A stage's data files mapped, and numpy views of each weight in them. Files holding weights a run
    reads in full are mapped populated (read here, not in run()); files of lookup tables only are
    mapped lazily, and `release_lookups()` drops the pages a run touched.

    Why: a lookup faults in far more than its rows (the kernel maps whole folios around each fault: 32
    GPT-2 medium token ids mapped 41 MiB of wte, 2048 ids 166 MiB, measured from RssFile), so a resident
    embeddings stage grew toward its whole table during a generation."""

    def __init__(self, directory: Path, weights: tuple[WeightRef, ...],
                 tables: frozenset[str] | set[str] = frozenset()):
        self.maps: dict[str, mmap.mmap] = {}
        self.starts: dict[str, int] = {}  # the file offset each mapping begins at
        self.lookups: list[mmap.mmap] = []
        read = read_spans(weights)
        for location in dict.fromkeys(w.location for w in weights):
            with open(directory / location, "rb") as f:  # tables: files looked up elsewhere, kept in small pages
                if location not in read:
                    self.maps[location] = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                    self.lookups.append(self.maps[location])
                    self.starts[location] = 0
                    continue
                start, end = read[location]
                start -= start % HUGE_PAGE  # keeps file offsets and addresses huge-page aligned alike
                self.maps[location] = map_populated(f.fileno(), end - start, start, location not in tables)
                self.starts[location] = start
        self.arrays = {w.input_name: np.frombuffer(self.maps[w.location], np.uint8, w.length,
                                                   w.offset - self.starts[w.location]).view(w.dtype).reshape(w.shape)
                       for w in weights}

    def release_lookups(self) -> None:
        """Unmaps the pages lookups touched (the page cache keeps them; the next lookup maps them again)."""
        for m in self.lookups:
            m.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.arrays.clear()
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        self.lookups.clear()


def read_spans(weights) -> dict[str, tuple[int, int]]:
    """By file, from the first to the last byte of the weights a stage reads in full (embedding tables are
    looked up, not read): what a load maps or reads, once per file. Read weight by weight from a cold
    cache, a block's small tensors came in through 4 KiB folios and its file lost its huge pages (GPT-2
    medium: 4 of 48 MiB left huge). A GPT-2 head part reads a quarter of the tied token table's file:
    mapping the whole file populated took 21 ms, against its own rows."""
    found: dict[str, tuple[int, int]] = {}
    read = {w.location for w in weights if not w.looked_up}
    for w in weights:  # a file read in part maps every weight it holds (a table's minimums beside its codes)
        if w.location in read:
            start, end = found.get(w.location, (w.offset, w.offset + w.length))
            found[w.location] = (min(start, w.offset), max(end, w.offset + w.length))
    return found


class TemplateStage:
    """A prepared stage run through its shared template session; reading the transposed layout, through the
    session for one row when its input is one row (graphs/transposed.py)."""

    def __init__(self, stage: StageSpec, form: Canonical, session: ort.InferenceSession, weights: MappedWeights,
                 batched: bool = False, steps_only: bool = False, one_row: ort.InferenceSession | None = None):
        self.stage, self.form, self.session, self.weights = stage, form, session, weights
        self.batched = batched  # prepared for a plan reading the transposed layout (format/batched_layout.py)
        self.steps_only = steps_only  # a template for generation steps only (Templates.form_for)
        self.one_row = one_row
        dtypes = {t.name: t.dtype for t in stage.inputs}  # the first float input's rows pick the session
        self.rows_input = next((n for n in form.inputs if np.issubdtype(np.dtype(dtypes[n]), np.floating)), None)
        self.feed_names = [(f"in_{k}", name) for k, name in enumerate(form.inputs)]
        self.output_names = [f"out_{k}" for k in range(len(form.outputs))]

    def session_for(self, tensors: dict[str, np.ndarray]) -> ort.InferenceSession:
        """The one-row session when the first float input (a block's hidden states [batch, sequence,
        width]) is one row. Which input that is comes from the manifest: this runs at every step."""
        if self.one_row is None or self.rows_input is None:
            return self.session
        shape = tensors[self.rows_input].shape
        return self.one_row if len(shape) >= 2 and math.prod(shape[:-1]) == 1 else self.session

    def run(self, tensors: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        feed = {key: tensors[name] for key, name in self.feed_names} | self.weights.arrays
        pairs = zip(self.output_names, self.form.outputs)
        bound = {key: into[name] for key, name in pairs if name in into} if into else {}
        try:
            values = run_session(self.session_for(tensors), self.output_names, feed, bound)
        except Exception as e:  # ORT's runtime errors are pybind types without a common base
            raise StageError(f"{self.stage.describe()}: run failed: {e}") from e
        finally:
            self.weights.release_lookups()
        return dict(zip(self.form.outputs, values))

    def close(self) -> None:
        self.weights.close()


class OwnedStage:
    """A prepared stage with a session of its own (prepacked, or a graph no other stage shares)."""

    def __init__(self, stage: StageSpec, session: ort.InferenceSession):
        self.stage, self.session = stage, session

    def run(self, tensors: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return run_stage(self.stage, self.session, tensors, into)

    def close(self) -> None:
        """Drops the session and hands its freed heap back to the OS (glibc keeps it otherwise)."""
        self.session = None
        give_back()
