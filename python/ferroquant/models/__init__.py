"""Model-level quantization."""

from .quantize_model import quantize_model
from .recipes import Recipe, recipe_for
from .serialization import load_bnb_4bit, load_quantized, save_quantized

__all__ = [
    "Recipe",
    "load_bnb_4bit",
    "load_quantized",
    "quantize_model",
    "recipe_for",
    "save_quantized",
]
