"""torch modules holding quantized weights."""

from .embedding import QuantEmbedding
from .fused import fuse_linears
from .linear import QuantLinear

__all__ = ["QuantEmbedding", "QuantLinear", "fuse_linears"]
