"""The Rust core's bf16 x^T x (`_native.gram_bf16`, the capture's Hessians where the forwards run
in bf16) against float64 sums of the same bf16 values, on every path that runs here (AMX tiles:
faithful-rounding bound, unit 2^-23; AVX-512 BF16 and the scalar reference: one chain rounded
to nearest, 2^-24); the AVX-512 kernel's bit equality with its reference is in
rust/core/src/gram/tests.rs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from ferroquant import _native  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(_native, "gram_bf16"), reason="extension too old")

PATHS = _native.gram_bf16_paths()
# each path's rounding unit for the additions (the AMX tiles' adds are faithful, not nearest)
UNIT = {"amx": 2.0**-23, "avx512bf16": 2.0**-24, "scalar": 2.0**-24}


def test_paths_fastest_first():
    assert PATHS[-1] == "scalar" and set(PATHS) <= set(UNIT)
    assert _native.gram_bf16_fast() == (PATHS[0] != "scalar")


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 100),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31),
    path=st.sampled_from([None, *PATHS]),
)
def test_within_the_summation_bound_and_exactly_symmetric(n, d, scale, seed, path):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale
    got = _native.gram_bf16(_bits(x), path)
    assert got.dtype == np.float32 and got.shape == (d, d)
    np.testing.assert_array_equal(got, got.T)
    xb = x.to(torch.bfloat16).double().numpy()
    exact = xb.T @ xb  # products of bf16 values are exact in float64, sums within 1e-16
    mass = np.abs(xb).T @ np.abs(xb)
    u = UNIT[path or PATHS[0]]
    gamma = n * u / (1 - n * u)
    assert np.all(np.abs(got - exact) <= gamma * mass + 1e-300)


@pytest.mark.skipif("amx" not in PATHS, reason="no AMX bf16 tiles on this CPU")
def test_amx_path_is_the_default_the_same_bits_for_every_thread_count():
    x = _bits(torch.randn(1000, 200, generator=torch.Generator().manual_seed(3)))
    threads = _native.num_threads()
    try:
        runs = []
        for t in (1, 2, 3):
            _native.set_num_threads(t)
            runs.append(_native.gram_bf16(x))
    finally:
        _native.set_num_threads(threads)
    for r in runs[1:]:
        np.testing.assert_array_equal(r.view(np.uint32), runs[0].view(np.uint32))
    np.testing.assert_array_equal(_native.gram_bf16(x, "amx"), runs[0])


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 400), d=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_exact_on_small_integers(n, d, seed):
    """Every partial sum is an integer below 2^24: the result is the exact sum, whatever the
    order, so a misplaced or dropped product shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 17, (n, d), generator=g)
    want = (x.T.long() @ x.long()).numpy()
    for path in PATHS:
        np.testing.assert_array_equal(_native.gram_bf16(_bits(x.float()), path), want)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="contiguous"):
        _native.gram_bf16(np.zeros((4, 6), np.uint16)[:, ::2])
    with pytest.raises(TypeError):
        _native.gram_bf16(np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match="not one of"):
        _native.gram_bf16(np.zeros((4, 6), np.uint16), "avx2")
    for path in {"amx", "avx512bf16"} - set(PATHS):
        with pytest.raises(ValueError, match="does not run on this CPU"):
            _native.gram_bf16(np.zeros((4, 6), np.uint16), path)
