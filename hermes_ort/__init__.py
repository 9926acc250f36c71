"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX stages through ORT."""
from .errors import BudgetError, HermesError, InputError, ManifestError, SplitError, StageError
from .ort_api import (ExecutionMode, GraphOptimizationLevel, RunOptions, SessionOptions, get_available_providers,
                      get_device, onnxruntime_version)
from .generation_api import generate, stream
from .generation.sampling import Sampling
from .session import InferenceSession, NodeArg
from .text_generator import TextGenerator
from .generation.tokenizer import Tokenizer

__version__ = "0.2.0"
__all__ = ["InferenceSession", "generate", "stream", "TextGenerator", "Tokenizer", "Sampling",
           "HermesError", "ManifestError", "InputError", "StageError", "BudgetError", "SplitError",
           # what onnxruntime apps touch (ort_api.py)
           "SessionOptions", "RunOptions", "GraphOptimizationLevel", "ExecutionMode", "NodeArg",
           "get_available_providers", "get_device", "onnxruntime_version", "__version__"]
