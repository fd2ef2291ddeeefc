"""Test matrices of several distributions, made fresh from a seed."""

from __future__ import annotations

import numpy as np

DISTRIBUTIONS = ("normal", "heavy_tailed", "outliers", "zero_and_constant_blocks", "tiny", "huge")


def make(dist: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal((rows, cols))
    elif dist == "heavy_tailed":
        x = rng.standard_t(2.0, (rows, cols))
    elif dist == "outliers":
        x = rng.standard_normal((rows, cols)) * 0.02
        mask = rng.random((rows, cols)) < 0.005
        x[mask] = rng.standard_normal(mask.sum()) * 20
    elif dist == "zero_and_constant_blocks":
        x = rng.standard_normal((rows, cols))
        flat = x.reshape(-1, 32)
        flat[::5] = 0.0
        flat[1::7] = 0.75
        flat[2::11] = -3.0
    elif dist == "tiny":
        x = rng.standard_normal((rows, cols)) * 1e-6
    elif dist == "huge":
        x = rng.standard_normal((rows, cols)) * 1e3
    else:
        raise ValueError(dist)
    return np.ascontiguousarray(x, dtype=np.float32)
