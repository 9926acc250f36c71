"""The on-disk contract of a model directory: manifest.json describes every stage without opening a graph.

A model directory holds manifest.json, one ONNX graph per stage and each stage's weights in an
external-data file. Tensor names are global: a stage input is either a model input or an output of an
earlier stage, so the manifest alone says which tensors flow where.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ManifestError

FORMAT = "hermes-ort/model"
VERSION = 1
MANIFEST_NAME = "manifest.json"
Dim = int | str  # a fixed size or a symbolic axis name ("batch", "sequence")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: numpy dtype name and shape with symbolic axes as strings."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        return f"{self.dtype} [{', '.join(str(d) for d in self.shape)}]"

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class FileSpec:
    """A file of the model directory, relative to it, with its size and sha256."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, directory: Path, path: str) -> "FileSpec":
        return cls(path, (directory / path).stat().st_size, sha256_of(directory / path))


@dataclass(frozen=True)
class StageSpec:
    """One stage: a graph file, its weight files, and its global input and output tensors."""

    name: str
    kind: str  # "embeddings", "block", "head" or "graph" (a split of a foreign model)
    graph: FileSpec
    weights: tuple[FileSpec, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def files(self) -> tuple[FileSpec, ...]:
        return (self.graph, *self.weights)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def describe(self) -> str:
        return f"stage '{self.name}' ({self.graph.path})"

    @classmethod
    def from_json(cls, d: dict) -> "StageSpec":
        return cls(
            name=d["name"], kind=d["kind"], graph=FileSpec(**d["graph"]),
            weights=tuple(FileSpec(**w) for w in d["weights"]),
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
        )


@dataclass(frozen=True)
class Manifest:
    """A whole model: family and config, model inputs/outputs, and the stages in execution order."""

    family: str
    config: dict
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stages: tuple[StageSpec, ...]
    tokenizer: str | None = None
    extra: dict = field(default_factory=dict)  # free-form facts (export max diff, source)
    files: tuple[FileSpec, ...] = ()  # files beside the stages: tokenizer.json, its config, generation_config.json
    version: int = VERSION

    @property
    def bytes(self) -> int:
        """Bytes on disk, counting a file shared by two stages once."""
        return sum({f.path: f.bytes for s in self.stages for f in s.files}.values())

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ManifestError(f"no stage named '{name}'; stages: {', '.join(s.name for s in self.stages)}")

    def feeds(self, tensor: str) -> tuple[str, ...]:
        """Names of the stages that consume a tensor (a model input or a stage output)."""
        return tuple(s.name for s in self.stages if any(t.name == tensor for t in s.inputs))

    def last_use(self) -> dict[str, int]:
        """Index of the last stage (or len(stages) for model outputs) that needs each tensor."""
        last = {t.name: len(self.stages) for t in self.outputs}
        for i, s in enumerate(self.stages):
            for t in s.inputs:
                last[t.name] = max(last.get(t.name, i), i)
        return last

    def to_json(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ManifestError(f"not a hermes-ort manifest (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ManifestError(f"manifest version {d.get('version')} is not supported (this build reads {VERSION})")
        return cls(
            family=d["family"], config=d["config"],
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            stages=tuple(StageSpec.from_json(s) for s in d["stages"]),
            tokenizer=d.get("tokenizer"), extra=d.get("extra", {}), version=d["version"],
            files=tuple(FileSpec(**f) for f in d.get("files", ())),
        )


def weights_note(manifest: Manifest) -> str:
    """' (seeded random weights, seed N)' for exports of a shape only, so no output passes them off as the
    published model; '' otherwise. Exports before the flag existed recorded only their seed."""
    random = manifest.extra.get("random_weights", manifest.extra.get("seed") is not None)
    return f" (seeded random weights, seed {manifest.extra.get('seed')})" if random else ""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_flow(manifest: Manifest) -> None:
    """Every stage input must exist before the stage runs, every model output must be produced."""
    available = {t.name for t in manifest.inputs}
    producer = {t.name: s for s in manifest.stages for t in s.outputs}
    for s in manifest.stages:
        missing = [t.name for t in s.inputs if t.name not in available]
        later = [f"'{t}' from {producer[t].describe()}" for t in missing if t in producer]
        if later:
            raise ManifestError(f"{s.describe()} reads {', '.join(later)}, which runs after it")
        if missing:
            raise ManifestError(f"{s.describe()}: inputs {missing} are neither model inputs nor earlier outputs")
        available |= {t.name for t in s.outputs}
    missing = [t.name for t in manifest.outputs if t.name not in available]
    if missing:
        raise ManifestError(f"model outputs {missing} are produced by no stage")


def check_files(manifest: Manifest, directory: Path, deep: bool = False) -> None:
    """Every file exists with its recorded size (and, when deep, its sha256)."""
    owned = [(s.describe(), f) for s in manifest.stages for f in s.files] + [("model", f) for f in manifest.files]
    for owner, f in owned:
        path = directory / f.path
        if not path.is_file():
            raise ManifestError(f"{owner}: file {path} is missing")
        if path.stat().st_size != f.bytes:
            raise ManifestError(f"{owner}: file {path} has {path.stat().st_size} bytes, manifest says {f.bytes}")
        if deep and sha256_of(path) != f.sha256:
            raise ManifestError(f"{owner}: file {path} does not match its sha256 (corrupt)")


def load(directory: str | os.PathLike, deep: bool = False) -> Manifest:
    """Read and validate DIR/manifest.json; deep also hashes every file."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} is not a model directory: {MANIFEST_NAME} is missing")
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
    check_flow(manifest)
    check_files(manifest, directory, deep)
    return manifest


def save(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write manifest.json atomically (temp file + rename), so a reader never sees half a manifest."""
    check_flow(manifest)
    directory = Path(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".json")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
    os.replace(tmp, directory / MANIFEST_NAME)
    return directory / MANIFEST_NAME
