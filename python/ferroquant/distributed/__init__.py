"""Conversion and calibrated methods on a Ray cluster: a thin layer over the single-machine
per-tensor conversion and layer-by-layer capture.

    import ferroquant.distributed as fd
    fd.convert("Llama-3-8B/", "llama3.q4_k_m.gguf", "q4_k_m", address="auto")
    fd.convert("Llama-3-8B/", "llama3.gptq.gguf", "q4_k_m", method="gptq", address="auto")
    fd.quantize_model(model, "q4_k_m", method="gptq", calibration=ids, address="auto")
    fd.compute_imatrix(model, ids, names, address="auto")

Same bytes as `ferroquant.models.convert.hf_to_gguf`, `ferroquant.quantize_model` and
`methods.imatrix.compute_imatrix`. Ray is imported only when `convert` or
`connect` runs (the `distributed` extra)."""

from __future__ import annotations

from .calibrated import RayRunner, compute_imatrix, convert, quantize_model
from .driver import (
    DEFAULT_TASK_BYTES,
    DEFAULT_WINDOW,
    TRANSFERS,
    ClusterError,
    connect,
)
from .journal import side_path

__all__ = [
    "DEFAULT_TASK_BYTES",
    "DEFAULT_WINDOW",
    "TRANSFERS",
    "ClusterError",
    "RayRunner",
    "compute_imatrix",
    "connect",
    "convert",
    "quantize_model",
    "side_path",
]
