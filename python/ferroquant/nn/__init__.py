"""torch modules holding quantized weights."""

from .embedding import QuantEmbedding
from .linear import QuantLinear

__all__ = ["QuantEmbedding", "QuantLinear"]
