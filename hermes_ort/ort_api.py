"""What apps written against onnxruntime touch, so that `import hermes_ort as ort` (or putting hermes_ort in
sys.modules["onnxruntime"]) is the only change: option classes, provider and device queries, versions,
and the budget read from SessionOptions or the environment."""
from __future__ import annotations

import os
import warnings

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
               "run_async", "end_profiling", "get_profiling_start_time_ns", "get_modelmeta", "set_providers",
               "get_overridable_initializers")


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
