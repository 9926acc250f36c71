"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX stages through ORT."""
from .errors import BudgetError, HermesError, InputError, ManifestError, SplitError, StageError
from .generate import generate, stream
from .sampling import Sampling
from .session import InferenceSession
from .text import TextGenerator
from .tokenizer import Tokenizer

__all__ = ["InferenceSession", "generate", "stream", "TextGenerator", "Tokenizer", "Sampling", "HermesError", "ManifestError", "InputError", "StageError", "BudgetError",
           "SplitError"]
