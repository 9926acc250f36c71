"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX stages through ORT."""
from .errors import BudgetError, HermesError, InputError, ManifestError, SplitError, StageError
from .session import InferenceSession

__all__ = ["InferenceSession", "HermesError", "ManifestError", "InputError", "StageError", "BudgetError",
           "SplitError"]
