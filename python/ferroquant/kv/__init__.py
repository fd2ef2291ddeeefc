"""Quantized KV cache for transformers (`QuantizedCache`) and the exact cache sizes
(`kv_bytes_per_token`, `kv_cache_bytes`); see docs/kv.md. The native runtime's cache lives in
Rust and uses the same type definitions.

Names are imported on first use: the sizes need neither torch nor transformers."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "KV_TYPES": "types",
    "KVShape": "types",
    "kv_bytes_per_token": "types",
    "kv_cache_bytes": "types",
    "kv_full_precision_tokens": "types",
    "kv_window": "types",
    "kv_shape": "types",
    "kv_type": "types",
    "QuantizedCache": "cache",
    "QuantizedLayer": "cache",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module in ("cache", "codecs"):  # a missing optional dependency names its extra
        from .._extras import require

        require("torch", f"ferroquant.kv.{name}", "torch")
        require("transformers", f"ferroquant.kv.{name}", "hf")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cached: later look-ups skip __getattr__
    return value
