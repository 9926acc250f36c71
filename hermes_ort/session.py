"""hermes_ort.InferenceSession: the onnxruntime.InferenceSession API over a directory of streamed stages."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import manifest as manifest_io
from .chain import run_chain
from .errors import InputError
from .inputs import check_feed
from .manifest import TensorSpec
from .sessions import SessionConfig, open_stage

_ORT_TYPES = {"float32": "float", "float64": "double", "float16": "float16", "int64": "int64",
              "int32": "int32", "int8": "int8", "uint8": "uint8", "bool": "bool"}


@dataclass(frozen=True)
class NodeArg:
    """Mirrors onnxruntime.NodeArg: name, ORT type string and shape with symbolic axes as strings."""

    name: str
    type: str
    shape: list

    @classmethod
    def of(cls, spec: TensorSpec) -> "NodeArg":
        return cls(spec.name, f"tensor({_ORT_TYPES.get(spec.dtype, spec.dtype)})", list(spec.shape))


class InferenceSession:
    """Runs a model directory stage by stage; inputs are checked against the manifest before any load."""

    def __init__(self, model_dir: str | os.PathLike, config: SessionConfig = SessionConfig()):
        self.directory = Path(model_dir)
        self.manifest = manifest_io.load(self.directory)
        self.config = config

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg.of(t) for t in self.manifest.inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg.of(t) for t in self.manifest.outputs]

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        names = self._output_names(output_names)
        feed = check_feed(self.manifest, input_feed)
        outputs = run_chain(self.manifest, feed, lambda i: open_stage(
            self.directory, self.manifest.stages[i], self.config))
        return [outputs[n] for n in names]

    def _output_names(self, output_names: Sequence[str] | None) -> list[str]:
        known = [t.name for t in self.manifest.outputs]
        names = list(output_names) if output_names else known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; the model gives {known}")
        return names
