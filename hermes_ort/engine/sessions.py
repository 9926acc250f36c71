"""One policy for ORT session options, and opening / running a single stage with errors that name it."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from ..errors import StageError
from ..format.manifest import StageSpec
from .memory import map_large_allocations

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
    shared_arena: bool = False  # one CPU arena for the process instead of one per session, see below
    log_severity: int = 3  # ORT's: 0 verbose .. 3 errors only (an app's SessionOptions may ask for more)


_arena_lock = threading.Lock()
_arena_registered = False


def register_shared_arena() -> None:
    """Registers, once per process, the CPU arena that every stage session allocates from.

    A fresh session with its own arena pays for new activation memory in its first run (first run of a
    GPT-2 medium block: 17.5 -> 12.7 ms, measured with hermes profile's settings), and outputs it returned pin that arena's chunk after the session
    is destroyed (3.7 MiB per kept KV pair). A shared arena is faulted in once and reused by every stage.
    """
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 1, -1, -1))  # grow as requested
            _arena_registered = True


def session_options(config: SessionConfig) -> ort.SessionOptions:
    map_large_allocations()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = _LEVELS[config.optimization]
    opts.log_severity_level = config.log_severity
    shared = config.shared_arena and not config.prepacking  # packed weights would stay in the shared arena
    opts.enable_cpu_mem_arena = shared  # after their session is destroyed, so prepacked stages use malloc
    if shared:
        register_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
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
    check_io(stage, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])


def check_io(stage: StageSpec, inputs: list[str], outputs: list[str]) -> None:
    if sorted(inputs) != sorted(t.name for t in stage.inputs) or sorted(outputs) != sorted(
            t.name for t in stage.outputs):
        raise StageError(
            f"{stage.describe()}: graph takes {inputs} and gives {outputs}, "
            f"but the manifest says {[t.name for t in stage.inputs]} -> {[t.name for t in stage.outputs]}"
        )


def run_stage(stage: StageSpec, session: ort.InferenceSession, tensors: Mapping[str, np.ndarray],
              into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Runs one stage on the tensors it needs; returns its outputs by name (those in `into` written there)."""
    names = [t.name for t in stage.outputs]
    try:
        values = run_session(session, names, {t.name: tensors[t.name] for t in stage.inputs}, into or {})
    except Exception as e:  # ORT's runtime errors are pybind types without a common base
        raise StageError(f"{stage.describe()}: run failed: {e}") from e
    return dict(zip(names, values))


def run_session(session: ort.InferenceSession, names: list[str], feed: Mapping[str, np.ndarray],
                into: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """session.run, or with the outputs named in `into` bound to those arrays (IO binding): ORT writes
    them there instead of allocating (see generation/cache_buffers.py for why)."""
    if not into:
        return session.run(names, feed)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        if name in into:
            out = into[name]
            binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return [into[n] if n in into else value.numpy() for n, value in zip(names, binding.get_outputs())]
