"""The cache's rotation (docs/kv.md, "Rotation"): the normalized Walsh-Hadamard transform of each
head's head_dim values, in the native runtime's butterfly order (rust/core/src/runtime/kv/
rotate.rs, called here through `_native.kv_wht`): for h = 1, 2, 4, ...: each block of 2h values
(a, b) becomes (a + b, a - b), then every value times 1 / sqrt(head_dim) (float32). Orthogonal
and its own inverse, so rotating keys and query leaves q.k unchanged; an outlier channel is
spread over every channel, so a quantization group's range fits all its values.

Bit-exact with the scalar reference `reference.wht` (tests/test_kv_window.py). The decode step's
query and output are rotated inside the native attention call (`kv_attend_decode(...,
rotate=True)`), the step's key and value in place in the cache's buffers (`wht_`).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _native


def wht_(*xs: np.ndarray) -> None:
    """Rotate, in place, every row of the last axis (a power of two, contiguous; the other axes
    may be strided) of each writable float32 array; one native call, the GIL released."""
    _native.kv_wht(*xs)


def wht(x: torch.Tensor) -> torch.Tensor:
    """The rotation of a tensor's float32 values along its last axis: a new float32 tensor on
    x's device (x is kept)."""
    y = torch.empty(x.shape, dtype=torch.float32)
    y.copy_(x.detach())
    _native.kv_wht(y.numpy())
    return y.to(x.device)
