"""The sub-manifest of a stage range: what one board runs, and what enters and leaves it.

A range is half-open, `[start, stop)` as `range()` is: stages start .. stop - 1 of the model's manifest.
Its inputs are the tensors its stages consume that no stage of the range produces (model inputs or earlier
stages' outputs); its outputs are the tensors it produces that a later stage or the model's outputs consume.
Both come from the manifest's own flow (tensor names are global), never from stage names. A range written
as a directory (`write_range`) is a plain model directory: a hermes InferenceSession opens it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError
from ..format import manifest as manifest_io
from ..format.manifest import FileSpec, Manifest, TensorSpec
from ..planning.profiles import DECODE_PROFILE_NAME, PROFILE_NAME

PAST, PRESENT = "past.", "present."


@dataclass(frozen=True)
class StageRange:
    """Stages [start, stop) of a model: half-open, so ranges of a model tile it as range() tiles ints."""

    start: int
    stop: int

    def __post_init__(self):
        if not 0 <= self.start < self.stop:
            raise ManifestError(f"a stage range needs 0 <= start < stop, got [{self.start}, {self.stop})")

    def __len__(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"stages [{self.start}, {self.stop})"


@dataclass(frozen=True)
class RangeFlow:
    """Names of what crosses a range's edge, each group in the order the manifest meets it."""

    from_model: tuple[str, ...]  # model inputs its stages read (ids, mask, its layers' past.*)
    from_upstream: tuple[str, ...]  # outputs of earlier ranges' stages it reads (hidden states)
    forward: tuple[str, ...]  # what it produces for later stages (the next range's hidden state)
    model_outputs: tuple[str, ...]  # model outputs it produces (its present.*, logits in the last range)

    @property
    def cache(self) -> dict[str, str]:
        """past input -> the present output of this range that feeds it on the next step (its KV cache)."""
        made = set(self.model_outputs)
        return {p: PRESENT + p[len(PAST):] for p in self.from_model
                if p.startswith(PAST) and PRESENT + p[len(PAST):] in made}


def check_ranges(manifest: Manifest, ranges: list[StageRange]) -> None:
    """Ranges must tile the stages in order: [0, a), [a, b), ..., [y, len(stages))."""
    stops = [0] + [r.stop for r in ranges]
    if not ranges or [r.start for r in ranges] != stops[:-1] or stops[-1] != len(manifest.stages):
        shown = ", ".join(f"[{r.start}, {r.stop})" for r in ranges) or "none"
        raise ManifestError(f"ranges {shown} do not tile the {len(manifest.stages)} stages of the model in order")


def flow(manifest: Manifest, r: StageRange) -> RangeFlow:
    """What enters and leaves stages [start, stop), read from the manifest's tensor names."""
    if r.stop > len(manifest.stages):
        raise ManifestError(f"{r.describe()} is beyond the model's {len(manifest.stages)} stages")
    inside = manifest.stages[r.start:r.stop]
    made = {t.name for s in inside for t in s.outputs}
    read = unique(t.name for s in inside for t in s.inputs if t.name not in made)
    model_inputs = {t.name for t in manifest.inputs}
    later = {t.name for s in manifest.stages[r.stop:] for t in s.inputs}
    model_outputs = {t.name for t in manifest.outputs}
    produced = unique(t.name for s in inside for t in s.outputs)
    return RangeFlow(from_model=tuple(n for n in read if n in model_inputs),
                     from_upstream=tuple(n for n in read if n not in model_inputs),
                     forward=tuple(n for n in produced if n in later),
                     model_outputs=tuple(n for n in produced if n in model_outputs))


def range_manifest(manifest: Manifest, r: StageRange) -> Manifest:
    """The manifest of stages [start, stop) alone: inputs and outputs as `flow` says, specs as the model's."""
    spec = specs(manifest)
    f = flow(manifest, r)
    outputs = unique((*f.forward, *f.model_outputs))
    extra = {**manifest.extra, "range": [r.start, r.stop], "stages_of_model": len(manifest.stages)}
    return dataclasses.replace(manifest, inputs=tuple(spec[n] for n in (*f.from_model, *f.from_upstream)),
                               outputs=tuple(spec[n] for n in outputs), stages=manifest.stages[r.start:r.stop],
                               tokenizer=None, files=(), extra=extra)


def specs(manifest: Manifest) -> dict[str, TensorSpec]:
    """Every tensor's spec: model inputs, then each stage output (the producer's declaration)."""
    return {t.name: t for t in (*manifest.inputs, *(t for s in manifest.stages for t in s.outputs))}


def unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def range_files(manifest: Manifest) -> tuple[FileSpec, ...]:
    """Each file the range's stages read, once (a tied table serves the embeddings and the head)."""
    return tuple({f.path: f for s in manifest.stages for f in s.files}.values())


def write_range(source: str | os.PathLike, manifest: Manifest, r: StageRange, target: str | os.PathLike) -> Path:
    """A model directory at `target` (new or empty) holding only the range's manifest and its stages' files,
    hard-linked from `source` (symlinked across filesystems), so a session there can open no other stage's
    file. Only the range's files need exist under `source`: a board keeps just its own. profile.json and
    profile-decode.json, when the source has them, are cut to the range's stages."""
    source, target = Path(source), Path(target)
    sub = range_manifest(manifest, r)
    if target.exists() and any(target.iterdir()):
        raise ManifestError(f"{target} is not empty: a range is written into a new directory")
    target.mkdir(parents=True, exist_ok=True)
    for f in range_files(sub):
        link(source / f.path, target / f.path)
    for name in (PROFILE_NAME, DECODE_PROFILE_NAME):
        if (source / name).is_file():
            cut_profile(source / name, target / name, {s.name for s in sub.stages})
    manifest_io.save(sub, target)
    return target


def link(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise ManifestError(f"{src} is missing: the board needs its range's files")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (or one without hard links)
        os.symlink(src.resolve(), dst)


def cut_profile(src: Path, dst: Path, names: set[str]) -> None:
    profile = json.loads(src.read_text())
    profile["stages"] = [s for s in profile["stages"] if s["name"] in names]
    dst.write_text(json.dumps(profile, indent=1))
