"""Model-level quantization: recipes, quantize_model, conversion between Hugging Face folders and
GGUF, quantized checkpoints (ours, and GPTQ / AWQ folders both ways), GGUF files as transformers
models, and CPU/GPU offload.

Names are imported on first use, so that `ferroquant.models.convert` (GGUF work, no torch
needed for requantizing) does not pull in torch through `quantize_model`."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Recipe": "recipes",
    "recipe_for": "recipes",
    "gguf_to_hf": "convert",
    "hf_to_gguf": "convert",
    "quantize_gguf": "convert",
    "quantize_model": "quantize",
    "load_bnb_4bit": "serialization",
    "load_quantized": "serialization",
    "save_quantized": "serialization",
    "load_gguf_model": "gguf_model",
    "save_gguf_model": "gguf_model",
    "offload": "offloading",
    "load_checkpoint": "ecosystem",
    "save_checkpoint": "ecosystem",
    "convert_to_checkpoint": "ecosystem",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cached: later look-ups skip __getattr__
    return value
