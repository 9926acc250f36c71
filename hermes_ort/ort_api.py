"""What apps written against onnxruntime touch, so that `import hermes_ort as ort` (or putting hermes_ort in
sys.modules["onnxruntime"]) is the only change: option classes, provider and device queries, versions,
and the budget read from SessionOptions or the environment."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import onnxruntime as _ort

from .errors import InputError

SessionOptions = _ort.SessionOptions
RunOptions = _ort.RunOptions
GraphOptimizationLevel = _ort.GraphOptimizationLevel
ExecutionMode = _ort.ExecutionMode
onnxruntime_version = _ort.__version__

PROVIDER = "CPUExecutionProvider"
BUDGET_KEY = "hermes.memory_budget"  # sess_options.add_session_config_entry(BUDGET_KEY, "300MiB")
BUDGET_ENV = "HERMES_ORT_MEMORY_BUDGET"
UNSUPPORTED = ("io_binding", "run_with_iobinding", "run_with_ort_values", "run_with_ortvaluevector",
               "run_async", "end_profiling", "get_profiling_start_time_ns", "set_providers",
               "get_overridable_initializers")


@dataclass(frozen=True)
class ModelMetadata:
    """What onnxruntime's ModelMetadata holds, from the manifest: the family as graph name, the manifest's
    facts (source, seed, export or conversion checks) as custom metadata strings."""

    producer_name: str = "hermes-ort"
    graph_name: str = ""
    domain: str = ""
    description: str = ""
    graph_description: str = ""
    version: int = 0
    custom_metadata_map: dict = field(default_factory=dict)

    @classmethod
    def of(cls, manifest) -> "ModelMetadata":
        facts = {k: v if isinstance(v, str) else json.dumps(v) for k, v in manifest.extra.items()}
        return cls(graph_name=manifest.family, version=manifest.version, custom_metadata_map=facts)


def threads_of(sess_options) -> int:
    """The app's intra_op_num_threads (0: let the plan choose)."""
    return getattr(sess_options, "intra_op_num_threads", 0) or 0


def log_severity_of(sess_options, default: int = 3) -> int:
    """The app's log_severity_level when it asked for one other than ORT's default warning level."""
    level = getattr(sess_options, "log_severity_level", 2)
    return default if level == 2 else level


def get_available_providers() -> list[str]:
    return [PROVIDER]


def get_device() -> str:
    return "CPU"


def check_providers(providers) -> None:
    """CPUExecutionProvider must be among them; others are ignored with a warning (stages run on CPU)."""
    if providers is None:
        return
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    if PROVIDER not in names:
        raise InputError(f"hermes_ort runs stages on {PROVIDER} only; providers {names} do not include it")
    if others := [n for n in names if n != PROVIDER]:
        warnings.warn(f"hermes_ort ignores providers {others}: every stage runs on {PROVIDER}", stacklevel=3)


def budget_of(memory_budget, sess_options) -> int | str | None:
    """The budget argument, else the session option `hermes.memory_budget`, else $HERMES_ORT_MEMORY_BUDGET."""
    if memory_budget is not None:
        return memory_budget
    if sess_options is not None:
        try:
            return sess_options.get_session_config_entry(BUDGET_KEY)
        except RuntimeError:  # ORT's answer for a key never set
            pass
    return os.environ.get(BUDGET_ENV) or None
