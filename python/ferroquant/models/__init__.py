"""Model-level quantization."""

from .quantize_model import quantize_model
from .recipes import Recipe, recipe_for

__all__ = ["Recipe", "quantize_model", "recipe_for"]
