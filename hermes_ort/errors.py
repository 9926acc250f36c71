"""The few error types users catch: everything the runtime raises on bad input is a HermesError, and each
is also what onnxruntime raises for the same misuse, so an app's existing `except` clauses keep working."""

from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument


class HermesError(Exception):
    """Base of every error hermes_ort raises on purpose."""


class ManifestError(HermesError, Fail):
    """A model directory or its manifest.json is missing, corrupt or inconsistent."""


class InputError(HermesError, InvalidArgument, ValueError):
    """A caller's input does not match what the manifest declares."""


class StageError(HermesError, Fail):
    """A stage failed to load or run; the message names the stage and its file."""


class BudgetError(HermesError):
    """The memory budget cannot be met by any plan."""


class SplitError(HermesError):
    """An ONNX graph cannot be cut into stages as asked."""


class RunTerminated(HermesError, Fail):
    """run_options.terminate was set during a run: it stopped between stages (ORT raises Fail there too)."""
