"""Making stages on the board: Llama-family GGUF files converted without torch."""
from .convert import PRECISIONS, ConvertResult, convert_gguf
from .gguf_model import ConvertError

__all__ = ["PRECISIONS", "ConvertError", "ConvertResult", "convert_gguf"]
