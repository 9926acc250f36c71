"""Export a model into a model directory that proves itself before it is published.

Stages are built in a hidden temporary directory beside the target, the stage chain is run in ORT against
torch's outputs, and only then is the directory renamed into place: a failed or interrupted export leaves
nothing that looks like a model.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import hermes_ort
from hermes_ort.format import manifest as manifest_io
from hermes_ort.convert.convert import write_stages
from hermes_ort.convert.float_weights import Float32Weights
from hermes_ort.errors import HermesError
from hermes_ort.format.manifest import FileSpec, Manifest, StageSpec
from hermes_ort.format.publish import building
from hermes_ort.format.stage_files import write_stage
from hermes_ort.generation.tokenizer import TOKENIZER_FILES
from hermes_ort.format.weights import WeightWriter, source_reader

from .families import load_source
from .family import Family
from .onnx_stage import as_torch, export_stage, run_torch
from .simplify import simplified

TOLERANCE = 1e-4


class ExportError(HermesError):
    """The exported stages do not reproduce the torch model."""


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    directory: Path
    seconds: float
    max_diff: float


def export_model(source: str, out: str | os.PathLike, seed: int = 0, simplify: bool = True,
                 progress: bool = True, random_weights: bool = False) -> ExportResult:
    """SOURCE: a local transformers folder, a Hugging Face repository id or a table name: the published
    model it names, or with random_weights seeded random weights of its shape (marked in the manifest)."""
    start = time.perf_counter()
    family, model, folder = load_source(source, seed, random_weights)
    rng = np.random.default_rng(seed)
    cases = family.cases(model, rng)  # torch references first: exporting may change later eager outputs
    with building(out) as tmp:
        if family.graphs is not None:  # written by hand (Llama family), the same graphs as hermes convert
            tensors = family.graphs(model)
            stages = write_stages(tensors, Float32Weights(tensors), tmp, None)
        else:
            stages = build_stages(family, model, family.trace_feed(model, rng), tmp, simplify, progress)
        manifest = describe(family, model, stages, source, seed, folder, tmp)
        manifest_io.save(manifest, tmp)
        diff = verify(tmp, cases)
        manifest = dataclasses.replace(manifest, extra={**manifest.extra, "max_abs_diff": diff})
        manifest_io.save(manifest, tmp)
    return ExportResult(manifest, Path(out), time.perf_counter() - start, diff)


def build_stages(family: Family, model, feed, directory: Path, simplify: bool, progress: bool) -> list[StageSpec]:
    tensors = as_torch(feed)
    writer, specs = WeightWriter(directory), []
    for plan in tqdm(family.stages(model), desc="export", unit="stage", disable=not progress):
        graph = export_stage(plan, tensors)
        graph = simplified(graph) if simplify else graph
        specs.append(write_stage(graph, directory, plan.name, plan.kind, writer, source_reader(directory)))
        if plan.row_slices is not None:
            writer.register_rows(*plan.row_slices)
        tensors.update(run_torch(plan, tensors))
    return specs


def describe(family: Family, model, stages: list[StageSpec], source: str, seed: int, folder: Path | None,
             directory: Path) -> Manifest:
    produced = {t.name for s in stages for t in s.outputs}
    consumed = {t.name for s in stages for t in s.inputs}
    inputs = {t.name: t for s in stages for t in s.inputs if t.name not in produced}
    outputs = [t for s in stages for t in s.outputs if t.name not in consumed or t.name in family.keep_outputs]
    files = copy_extras(family, folder, directory)
    tokenizer = "tokenizer.json" if any(f.path == "tokenizer.json" for f in files) else None
    return Manifest(family=family.name, config=model.config.to_diff_dict(), inputs=tuple(inputs.values()),
                    outputs=tuple(outputs), stages=tuple(stages), tokenizer=tokenizer,
                    extra={"source": str(source), "random_weights": folder is None,
                           "seed": seed if folder is None else None}, files=files)


def copy_extras(family: Family, folder: Path | None, directory: Path) -> tuple[FileSpec, ...]:
    """The source folder's tokenizer and generation files, copied and listed with their sizes and sha256."""
    names = dict.fromkeys((*TOKENIZER_FILES, *family.extra_files))
    copied = [name for name in names if folder is not None and (folder / name).is_file()]
    for name in copied:
        shutil.copyfile(folder / name, directory / name)
    return tuple(FileSpec.of(directory, name) for name in copied)


def verify(directory: Path, cases) -> float:
    """Max abs difference between ORT's stage chain and torch over every case; raises above TOLERANCE."""
    with hermes_ort.InferenceSession(directory) as session:
        run = lambda feed: dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        worst = 0.0
        for case in cases:
            got = case.run(run)
            for name, want in case.expected.items():
                diff = float(np.max(np.abs(got[name] - want)))
                if not diff <= TOLERANCE:
                    raise ExportError(f"export check '{case.name}': output '{name}' differs from torch by "
                                      f"{diff:.3g} (tolerance {TOLERANCE})")
                worst = max(worst, diff)
    return worst
