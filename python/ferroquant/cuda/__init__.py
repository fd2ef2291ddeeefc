"""The GPU path: `nvrtc.py` compiles the kernel sources of the top-level `cuda/` folder with NVRTC
(disk cache, launch on torch's current stream), `qmatmul.py` is the CUDA kernel of the
`ferroquant::qmatmul` op. Importing either never touches a GPU; the first GPU call raises
`CudaUnavailable` naming what is missing."""

from __future__ import annotations

from .nvrtc import CudaUnavailable

__all__ = ["CudaUnavailable"]
