"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX stages through ORT."""
from .errors import BudgetError, HermesError, InputError, ManifestError, SplitError, StageError
from .generate import generate, stream
from .session import InferenceSession

__all__ = ["InferenceSession", "generate", "stream", "HermesError", "ManifestError", "InputError", "StageError", "BudgetError",
           "SplitError"]
