"""The cache's rotation (docs/kv.md, "Rotation"): the normalized Walsh-Hadamard transform of each
head's head_dim values, in the native runtime's butterfly order (rust/core/src/runtime/kv/
rotate.rs): for h = 1, 2, 4, ...: each block of 2h values (a, b) becomes (a + b, a - b), then
every value times 1 / sqrt(head_dim) (float32). Orthogonal and its own inverse, so rotating keys
and query leaves q.k unchanged; an outlier channel is spread over every channel, so a
quantization group's range fits all its values.

Vectorized over everything but the last axis (numpy float32: each element sees the same float
operations in the same order as `reference.wht`, so the bits agree; tests/test_kv.py).
"""

from __future__ import annotations

import numpy as np
import torch


def wht_numpy(x: np.ndarray) -> np.ndarray:
    """H x / sqrt(n) along the last axis of a float32 array (n a power of two); a new array."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"kv rotation: head_dim {n} is not a power of two")
    lead = x.shape[:-1]
    a = np.array(x, dtype=np.float32, copy=True).reshape(-1, n)  # a copy: the input is kept
    b = np.empty_like(a)
    h = 1
    while h < n:
        src = a.reshape(-1, n // (2 * h), 2, h)
        dst = b.reshape(-1, n // (2 * h), 2, h)
        np.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        np.subtract(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        a, b = b, a
        h *= 2
    a *= np.float32(1) / np.sqrt(np.float32(n))
    return a.reshape(*lead, n)


def wht(x: torch.Tensor) -> torch.Tensor:
    """`wht_numpy` of a tensor's float32 values, as a float32 CPU tensor (x's device kept)."""
    src = x.detach().to("cpu", torch.float32).numpy()
    return torch.from_numpy(wht_numpy(src)).to(x.device)


def matrix(n: int) -> torch.Tensor:
    """The same transform as an (n, n) float32 matrix (rows: H / sqrt(n), symmetric), for the
    decode step's query and output, where a matmul is cheaper than the butterfly and the
    rounding only has to stay within the attention's error bound."""
    return wht(torch.eye(n, dtype=torch.float32))


class Butterfly:
    """`wht_numpy` for a fixed number of rows, with its buffers and per-level views built once:
    the decode step rotates one token's keys and values per layer, where numpy's per-call
    overhead (reshapes, fresh arrays, short inner loops), not the arithmetic, is the cost. The
    buffers hold the rows as columns (n x rows), so each level's inner loop runs over h x rows
    contiguous values. Same operations in the same order as `wht_numpy`, so the same bits."""

    def __init__(self, rows: int, n: int) -> None:
        if n & (n - 1):
            raise ValueError(f"kv rotation: head_dim {n} is not a power of two")
        self.shape = (rows, n)
        self.bufs = (np.empty((n, rows), np.float32), np.empty((n, rows), np.float32))
        self.levels = []
        a, b, h = self.bufs[0], self.bufs[1], 1
        while h < n:
            src, dst = a.reshape(n // (2 * h), 2, h * rows), b.reshape(n // (2 * h), 2, h * rows)
            self.levels.append((src[:, 0], src[:, 1], dst[:, 0], dst[:, 1]))
            a, b, h = b, a, 2 * h
        self.result = a
        self.norm = np.float32(1) / np.sqrt(np.float32(n))

    def __call__(self, *xs: np.ndarray) -> np.ndarray:
        """The rotation of the rows of `xs` (together rows x n values), stacked in order
        (rows x n): a view of a buffer that the next call overwrites."""
        at = 0
        for x in xs:
            m = x.size // self.shape[1]
            np.copyto(self.bufs[0][:, at : at + m], x.reshape(m, self.shape[1]).T)
            at += m
        for s0, s1, d0, d1 in self.levels:
            np.add(s0, s1, out=d0)
            np.subtract(s0, s1, out=d1)
        self.result *= self.norm
        return self.result.T
