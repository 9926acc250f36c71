"""Consecutive resident stages run as ONE ORT session.

With every SmolLM2 stage resident, a decoding step made 39 session runs where whole-model ORT makes one,
over the same graphs: each run costs its feed, its binding and its kernel launches. A run of stages the
plan keeps resident and prepacked is merged into one graph (graphs/merge.py), built once per plan, its
weights read from the stages' own data files. What crosses the run's boundary is exactly what the chain
says crosses it (merge.crossing); the tensors inside it never reach Python.

Not merged: stages the plan streams, template stages that only look rows up (their pages are let go after
every run: prepared.MappedWeights.release_lookups), and, outside generation, a head with the blocks before
it. A generation step's run takes the head in and cuts its input to the last position inside the graph,
as the decoding chain does outside (run_chain.last_position_only): such a run serves generation steps only.

A plan that streams nothing runs its one merged session with spinning threads, as whole-model ORT does
(no loader wants the cores): SmolLM2 native, all resident, `python -m bench.generate`, 86.1 tokens/s
against 85.4 for whole-model ORT (README); its blocks and head as two sessions without spinning, 0.83x.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import StageError
from ..format.manifest import Manifest, StageSpec
from ..graphs.merge import crossing, merged_model
from .memory import give_back
from .plan import Plan
from .sessions import SessionConfig, check_io, run_session, session_options

MIN_RUN = 2  # one stage alone keeps the session it has


class MergedStages:
    """Stages [start, stop) (half-open) in one session; `run` takes and gives tensors by global name."""

    def __init__(self, directory: Path, manifest: Manifest, start: int, stop: int, config: SessionConfig,
                 decoding: bool = False):
        self.start, self.stop = start, stop
        self.stages: tuple[StageSpec, ...] = manifest.stages[start:stop]
        self.inputs, self.outputs = crossing(manifest, start, stop)
        self.steps_only = decoding and heads_after_blocks(self.stages)  # Resident.keep_only: not for a pass
        self.spinning = config.spinning
        opts = session_options(config)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
        model = merged_model(directory, manifest, start, stop, check_io, last_position_heads=self.steps_only)
        try:
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's pybind errors
            raise StageError(f"{self.describe()}: cannot create their merged session: {e}") from e

    def describe(self) -> str:
        return f"stages {self.stages[0].name}..{self.stages[-1].name} ({self.stop - self.start} merged)"

    def run(self, tensors: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        try:
            values = run_session(self.session, self.outputs, {n: tensors[n] for n in self.inputs}, into or {})
        except Exception as e:  # ORT's runtime errors are pybind types without a common base
            raise StageError(f"{self.describe()}: run failed: {e}") from e
        return dict(zip(self.outputs, values))

    def close(self) -> None:
        if self.session is not None:
            self.session = None
            give_back()


def heads_after_blocks(stages: tuple[StageSpec, ...]) -> bool:
    kinds = [s.kind == "head" for s in stages]
    return any(kinds) and not kinds[0]


def mergeable_runs(manifest: Manifest, plan: Plan, lookups: set[str], decoding: bool = False) -> list[tuple[int, int]]:
    """Maximal half-open ranges [start, stop) of at least MIN_RUN consecutive stages the plan keeps resident
    and prepacked, none of them in `lookups` (stage names), a head after a non-head only when decoding."""
    runs: list[list[int]] = []
    for i, stage in enumerate(manifest.stages):
        if stage.name not in plan.resident or stage.name not in plan.prepacked or stage.name in lookups:
            continue
        previous = manifest.stages[i - 1] if i else None
        if runs and runs[-1][1] == i and (decoding or stage.kind != "head" or previous.kind == "head"):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs if b - a >= MIN_RUN]
