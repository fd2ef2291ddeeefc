"""ferroquant: fast, bit-exact weight quantization with a Rust core.

import ferroquant as fq
qt = fq.quantize(w, "q4_k")          # ggml, bitsandbytes, int8 and fp8 formats
w2 = fq.dequantize(qt)
"""

from __future__ import annotations

from typing import Any

from . import _native
from ._native import FormatError, QuantizeError
from .qtypes import QType, qtype_info, qtypes
from .tensor import DoubleQuantState, QTensor, dequantize, quantize

__version__ = _native.__version__


def quantize_model(model: Any, recipe: Any = "q4_k_m", **kwargs: Any) -> Any:
    """Quantize the nn.Linear layers of a torch model in place (see ferroquant.models)."""
    from .models import quantize_model as _quantize_model

    return _quantize_model(model, recipe, **kwargs)


def set_num_threads(n: int) -> None:
    """Threads used by the Rust core (0 = all cores). Results never depend on it."""
    _native.set_num_threads(int(n))


def num_threads() -> int:
    return _native.num_threads()


__all__ = [
    "DoubleQuantState",
    "FormatError",
    "QTensor",
    "QType",
    "QuantizeError",
    "dequantize",
    "num_threads",
    "qtype_info",
    "qtypes",
    "quantize",
    "quantize_model",
    "set_num_threads",
]
