"""One policy for ORT session options, and opening / running a single stage with errors that name it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from .errors import StageError
from .manifest import StageSpec

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """ORT settings for one stage. intra_op_threads=0 lets ORT choose; prepacking trades memory and
    create time for 15-20% faster MatMuls (shared/FACTS.md)."""

    intra_op_threads: int = 0
    prepacking: bool = True
    spinning: bool = True
    optimization: str = "all"
    arena: bool = False  # off: outputs of an arena session pin its whole arena chunk after the session is
    # destroyed (3.7 MiB per kept GPT-2 KV pair); measured no slower without it on BERT-large blocks


def session_options(config: SessionConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = _LEVELS[config.optimization]
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = config.arena
    if not config.prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not config.spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def open_stage(directory: Path, stage: StageSpec, config: SessionConfig) -> ort.InferenceSession:
    """Creates the stage's session; ORT's failure becomes a StageError naming the stage and file."""
    path = Path(directory) / stage.graph.path
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(config),
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several pybind types (Fail, InvalidProtobuf, NoSuchFile)
        raise StageError(f"{stage.describe()}: cannot load {path}: {e}") from e
    check_session_io(stage, session)
    return session


def check_session_io(stage: StageSpec, session: ort.InferenceSession) -> None:
    """The graph on disk must take and give exactly what the manifest says."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if sorted(inputs) != sorted(t.name for t in stage.inputs) or sorted(outputs) != sorted(
            t.name for t in stage.outputs):
        raise StageError(
            f"{stage.describe()}: graph takes {inputs} and gives {outputs}, "
            f"but the manifest says {[t.name for t in stage.inputs]} -> {[t.name for t in stage.outputs]}"
        )


def run_stage(stage: StageSpec, session: ort.InferenceSession,
              tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs one stage on the tensors it needs; returns its outputs by name."""
    names = [t.name for t in stage.outputs]
    try:
        values = session.run(names, {t.name: tensors[t.name] for t in stage.inputs})
    except Exception as e:  # ORT's runtime errors are pybind types without a common base
        raise StageError(f"{stage.describe()}: run failed: {e}") from e
    return dict(zip(names, values))
