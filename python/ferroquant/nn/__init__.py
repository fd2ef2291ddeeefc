"""torch modules holding quantized weights."""

from .linear import QuantLinear

__all__ = ["QuantLinear"]
