"""Model-level quantization."""

from .convert import gguf_to_hf, hf_to_gguf, quantize_gguf
from .quantize_model import quantize_model
from .recipes import Recipe, recipe_for
from .serialization import load_bnb_4bit, load_quantized, save_quantized

__all__ = [
    "Recipe",
    "gguf_to_hf",
    "hf_to_gguf",
    "load_bnb_4bit",
    "load_quantized",
    "quantize_gguf",
    "quantize_model",
    "recipe_for",
    "save_quantized",
]
