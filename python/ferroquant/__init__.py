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


def offload(model: Any, max_gpu_memory: Any = 0, device: Any = None, **kwargs: Any) -> Any:
    """Split a torch model between a GPU and the CPU, on accelerate's hooks (the `hf` extra);
    returns the plan (see ferroquant.models.offloading)."""
    from .models.offloading import offload as _offload

    return _offload(model, max_gpu_memory, device, **kwargs)


def load_gguf_model(path: Any, **kwargs: Any) -> Any:
    """A GGUF file as a transformers model with QuantLinear layers holding the file's bytes."""
    from .models.gguf_model import load_gguf_model as _load

    return _load(path, **kwargs)


def save_gguf_model(model: Any, path: Any, **kwargs: Any) -> Any:
    """Write a quantized transformers model to a GGUF file llama.cpp runs."""
    from .models.gguf_model import save_gguf_model as _save

    return _save(model, path, **kwargs)


def load_quantized(path: Any, **kwargs: Any) -> Any:
    """A GPTQ / AWQ checkpoint folder (GPTQModel, AutoAWQ, transformers, or ours) as a
    transformers model whose quantized Linears are QuantLinear over the checkpoint's codes."""
    from .models.ecosystem import load_checkpoint

    return load_checkpoint(path, **kwargs)


def __getattr__(name: str) -> Any:
    # FerroquantConfig needs transformers: imported (and registered with it) on first use
    if name == "FerroquantConfig":
        from .models.hf_quantizer import FerroquantConfig

        globals()[name] = FerroquantConfig
        return FerroquantConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_num_threads(n: int) -> None:
    """Threads used by the Rust core (0 = all cores). Results never depend on it."""
    _native.set_num_threads(int(n))


def num_threads() -> int:
    return _native.num_threads()


__all__ = [
    "DoubleQuantState",
    "FerroquantConfig",
    "FormatError",
    "QTensor",
    "QType",
    "QuantizeError",
    "dequantize",
    "load_gguf_model",
    "load_quantized",
    "num_threads",
    "offload",
    "qtype_info",
    "qtypes",
    "quantize",
    "quantize_model",
    "save_gguf_model",
    "set_num_threads",
]
