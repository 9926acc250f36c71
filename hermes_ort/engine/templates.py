"""Shared templates: one ORT session for every stage with the same graph (GPT-2's 24 blocks), weights fed
as inputs from memory-mapped data files.

A fresh session per block costs its creation and a slow first run (allocations, kernel state) on the
inference agent's critical path. A template is created once; streaming a block is then only mapping its
weights, which the loading agent does with every page present (page_cache.py: the disk read and the
page-table fill happen there, not as page faults inside run()).

Stage graphs are read and templates written over the wire format (format/onnx_proto.py): opening a model
does not import the `onnx` package.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ..errors import StageError
from ..format.integrity import FirstLoadCheck
from ..format.manifest import Manifest, StageSpec
from ..format.onnx_proto import NUMPY_NAMES, Graph, Model, Node, Tensor, Value, load_graph
from ..format.batched_layout import BatchedLayout, load_layout
from ..format.page_cache import lookup_files
from ..graphs.transposed import rewrite, rewrite_one_row
from .sessions import SessionConfig, session_options


@dataclass(frozen=True)
class WeightRef:
    """A template input fed from a data file: half-open byte range [offset, offset + length)."""

    input_name: str
    location: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    looked_up: bool = False  # only ever a Gather's table: a run reads a few rows, not the whole tensor


@dataclass(frozen=True)
class Canonical:
    """A stage graph with its tensors renamed by position and its external weights turned into inputs."""

    key: str  # sha256 of the canonical graph: equal keys share one session
    model: bytes
    inputs: tuple[str, ...]  # the stage's global input names, in template input order
    outputs: tuple[str, ...]
    weights: tuple[WeightRef, ...]
    needs_initializers: bool  # a kernel that must prepack its weight: fed as an input it redoes that every run
    quantized: bool  # MatMulNBits: without prepacking it dequantizes its whole matrix every run
    index_bounds: tuple[tuple[str, int], ...] = ()  # global inputs that index a table's rows, and its row count
    table_files: frozenset[str] = frozenset()  # data files holding a table a lookup reads rows of (page_cache.py)

    @property
    def looks_up_only(self) -> bool:
        """Every external weight is a table a run reads a few rows of (an embeddings stage)."""
        return bool(self.weights) and all(w.looked_up for w in self.weights)


def canonicalize(directory: Path, stage: StageSpec) -> Canonical:
    path = directory / stage.graph.path
    try:
        return canonical_form(load_graph(path))
    except (OSError, ValueError) as e:  # an unreadable file; wire.WireError, a name that is not UTF-8
        raise StageError(f"{stage.describe()}: cannot load {path}: {e}") from e
    except KeyError as e:  # an external weight without a location or length
        raise StageError(f"{stage.describe()}: {path} names an external weight without its {e}") from e


def canonical_form(model: Model) -> Canonical:
    """The template of a stage graph: tensors renamed by position (inputs in_k, outputs out_k, external
    weights w_k), node names cleared, external weights declared as inputs; what else the graph holds is
    kept, so stages with one graph form give equal bytes."""
    graph = model.graph
    external = [t for t in graph.initializers if t.external]
    rename = {v.name: f"in_{k}" for k, v in enumerate(graph.inputs)}
    rename |= {v.name: f"out_{k}" for k, v in enumerate(graph.outputs)}
    rename |= {t.name: f"w_{k}" for k, t in enumerate(external)}
    tables = lookup_tables(graph)
    weights = tuple(weight_ref(rename[t.name], t, t.name in tables) for t in external)
    nodes = [n.renamed(lambda t: rename.get(t, t), name="") for n in graph.nodes]  # names mean nothing to ORT
    inputs = [v.renamed(rename[v.name]) for v in graph.inputs] + [
        Value.tensor(w.input_name, t.data_type, w.shape) for w, t in zip(weights, external)]
    body = Graph.make(nodes, "template", inputs, [v.renamed(rename[v.name]) for v in graph.outputs],
                      [t for t in graph.initializers if not t.external])
    template = Model.make(body, model.opset_imports, model.ir_version, model.functions).to_bytes()
    weight_inputs = {w.input_name for w in weights}
    prepacks = any(repacks_every_run(n, weight_inputs) for n in nodes)
    quantized = any(n.op_type == "MatMulNBits" for n in nodes)
    return Canonical(hashlib.sha256(template).hexdigest(), template, tuple(v.name for v in graph.inputs),
                     tuple(v.name for v in graph.outputs), weights, prepacks, quantized, index_bounds(graph),
                     lookup_files(graph))


def index_bounds(graph: Graph) -> tuple[tuple[str, int], ...]:
    """Graph inputs used directly as row indices of a weight table (token ids into the vocabulary, position
    ids into GPT-2's position table), with the table's row count: out of range, ORT's Gather fails only when
    the stage runs, deep in a pass."""
    rows = {t.name: t.dims[0] for t in graph.initializers if t.dims}
    inputs = {v.name for v in graph.inputs}
    bounds = {}
    for n in graph.nodes:
        if n.op_type not in ("Gather", "GatherBlockQuantized"):
            continue
        axis = next((a.i for a in n.attributes if a.name in ("axis", "gather_axis")), 0)
        if axis == 0 and n.inputs[0] in rows and n.inputs[1] in inputs:
            bounds[n.inputs[1]] = min(bounds.get(n.inputs[1], rows[n.inputs[0]]), rows[n.inputs[0]])
    return tuple(bounds.items())


def check_extents(directory: Path, manifest: Manifest, canonical: dict[str, Canonical]) -> None:
    """Every weight's bytes lie inside its data file: a file cut short (with a manifest restated to match)
    is named when the session opens, not as a failed mmap deep inside a load."""
    sizes: dict[str, int] = {}
    for stage in manifest.stages:
        for w in canonical[stage.name].weights:
            if w.location not in sizes:
                try:
                    sizes[w.location] = (directory / w.location).stat().st_size
                except OSError as e:  # a data file the graph names but the manifest does not
                    raise StageError(f"{stage.describe()}: cannot read {w.location}: {e.strerror}") from e
            if w.offset + w.length > sizes[w.location]:
                raise StageError(f"{stage.describe()}: its weights need bytes up to {w.offset + w.length} of "
                                 f"{w.location}, which holds {sizes[w.location]}: the file is shorter than its "
                                 f"tensors")


def repacks_every_run(node: Node, weights: set[str]) -> bool:
    """Gemm(transB=1) transposes a weight input every run; MatMulNBits with its bits as an input falls back
    to dequantizing the whole matrix every run (SmolLM2 native: 1.2 against 40+ tokens/s)."""
    if node.op_type == "MatMulNBits":
        return len(node.inputs) > 1 and node.inputs[1] in weights
    trans_b = node.attribute("transB")
    return node.op_type == "Gemm" and len(node.inputs) > 1 and node.inputs[1] in weights and (
        trans_b is not None and trans_b.i == 1)


def weight_ref(name: str, tensor: Tensor, looked_up: bool) -> WeightRef:
    info = tensor.external
    if tensor.data_type not in NUMPY_NAMES:
        raise ValueError(f"weight {tensor.name!r} has ONNX data type {tensor.data_type}, which has no numpy dtype")
    return WeightRef(name, info["location"], int(info.get("offset", 0)), int(info["length"]),
                     NUMPY_NAMES[tensor.data_type], tensor.dims, looked_up)


def lookup_tables(graph: Graph) -> set[str]:
    """Tensors read only as the data of a Gather (embedding tables)."""
    uses: dict[str, set[str]] = {}
    for n in graph.nodes:
        for k, t in enumerate(n.inputs):
            uses.setdefault(t, set()).add("table" if n.op_type == "Gather" and k == 0 else "other")
    return {t for t, kinds in uses.items() if kinds == {"table"}}


class Templates:
    """The canonical form of every stage whose graph another stage shares, or whose weights are only looked
    up, and their sessions (made once, on first use, by whichever loading agent needs them first).
    GPT-2's head parts stay out of a pass: their Gemm(transB=1) ran 3x slower with the weight as an input
    at 128 positions (hermes profile, gpt2-medium); generation steps take them in (form_for). Embedding
    tables come in as inputs so that the pages a lookup maps can be let go after every run
    (prepared.MappedWeights.release_lookups)."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory, self.manifest = directory, manifest
        self.canonical = {s.name: canonicalize(directory, s) for s in manifest.stages}
        self.tables = frozenset().union(*(f.table_files for f in self.canonical.values()))  # in small pages
        self.integrity = FirstLoadCheck(directory, small_pages=self.tables)  # each file hashed once per session
        check_extents(directory, manifest, self.canonical)
        counts: dict[str, int] = {}
        for form in self.canonical.values():
            counts[form.key] = counts.get(form.key, 0) + 1
        self.forms = {name: f for name, f in self.canonical.items()
                      if (counts[f.key] > 1 or f.looks_up_only) and not f.needs_initializers}
        self.index_bounds: dict[str, int] = {}  # model inputs that index a table: ids must be in [0, rows)
        for form in self.canonical.values():
            for name, rows in form.index_bounds:
                self.index_bounds[name] = min(self.index_bounds.get(name, rows), rows)
        self.sessions: dict[str, ort.InferenceSession] = {}  # by graph key, thread count and layout
        self.lock = threading.Lock()
        self._batched: BatchedLayout | None | bool = False  # False: not read yet

    def form_for(self, name: str, decoding: bool = False) -> Canonical | None:
        """The stage's template, if it runs through one. A generation step also runs a graph no other stage
        shares (GPT-2's head parts) through a template of its own, made once: streamed with a session of
        its own, each load created one (GPT-2 medium head part: 14-18 ms, on the loader's CPU). At a
        step's few rows, Gemm(transB=1) with its weight as an input runs as fast as prepacked (MLAS's
        one-row kernel: 3.1 against 3.1 ms); a 4-bit MatMulNBits still needs its initializer."""
        form = self.forms.get(name)
        if form is None and decoding and self.canonical[name].weights and not self.canonical[name].quantized:
            form = self.canonical[name]
        return form

    def lookups(self) -> set[str]:
        """Stages run through a template that only looks rows up (their pages are let go after each run)."""
        return {name for name, form in self.forms.items() if form.looks_up_only}

    def session(self, form: Canonical, config: SessionConfig, transposed: tuple[str, ...] = (),
                one_row: bool = False) -> ort.InferenceSession:
        """One session per graph, thread count (a generation plan may run fewer threads than a pass) and
        layout (`transposed`: the weight inputs it takes transposed, read as one row needs them when
        `one_row`, graphs/transposed.py)."""
        key = f"{form.key}/{config.intra_op_threads}/{','.join(transposed)}/{'one' if one_row else 'rows'}"
        with self.lock:
            if key not in self.sessions:
                model = form.model if not transposed else (
                    rewrite_one_row(form.model, list(transposed)) if one_row else rewrite(form.model, list(transposed)))
                self.sessions[key] = ort.InferenceSession(model, session_options(config),
                                                          providers=["CPUExecutionProvider"])
            return self.sessions[key]

    def batched(self) -> BatchedLayout | None:
        """The model's batched layout (format/batched_layout.py), read once; None where there is none."""
        with self.lock:
            if self._batched is False:
                self._batched = load_layout(self.directory, self.manifest)
            return self._batched

    def close(self) -> None:
        self.sessions.clear()
