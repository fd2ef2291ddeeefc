"""Whether QuantLinear's native calls run on torch's OpenMP team (`qmatmul(..., openmp=True)`).

torch's OpenMP workers spin-wait after every torch op (norms, attention, SiLU) on the cores the
Rust pool's threads need; giving them the kernel's tasks instead removes the fight
(rust/core/src/openmp.rs). The same bits either way."""

from __future__ import annotations

import torch

from .. import _native, config

_attached: bool | None = None  # None: not tried yet


def torch_team() -> bool:
    """True when FERROQUANT_OPENMP is on and torch's ATen backend is OpenMP with its runtime
    attached (tried once per process: `_native.openmp_attach` on torch's `_C` extension)."""
    global _attached
    if not config.openmp():
        return False
    if _attached is None:
        openmp_backend = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
        _attached = openmp_backend and _native.openmp_attach(torch._C.__file__)
    return _attached
