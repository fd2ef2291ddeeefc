"""Conversion on a Ray cluster: a thin layer over the single-machine per-tensor conversion.

    import ferroquant.distributed as fd
    fd.convert("Llama-3-8B/", "llama3.q4_k_m.gguf", "q4_k_m", address="auto")

Same bytes as `ferroquant.models.convert.hf_to_gguf`. Ray is imported only when `convert` or
`connect` runs (the `distributed` extra)."""

from __future__ import annotations

from .driver import (
    DEFAULT_TASK_BYTES,
    DEFAULT_WINDOW,
    TRANSFERS,
    ClusterError,
    connect,
    convert,
)
from .journal import side_path

__all__ = [
    "DEFAULT_TASK_BYTES",
    "DEFAULT_WINDOW",
    "TRANSFERS",
    "ClusterError",
    "connect",
    "convert",
    "side_path",
]
