"""The Rust core's bf16 x^T x (`_native.gram_bf16`, the capture's Hessians where the forwards run
in bf16) against float64 sums of the same bf16 values; its kernel-vs-reference bit equality is
in rust/core/src/gram/tests.rs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from ferroquant import _native  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(_native, "gram_bf16"), reason="extension too old")


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 100),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31),
)
def test_within_the_summation_bound_and_exactly_symmetric(n, d, scale, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale
    got = _native.gram_bf16(_bits(x))
    assert got.dtype == np.float32 and got.shape == (d, d)
    np.testing.assert_array_equal(got, got.T)
    xb = x.to(torch.bfloat16).double().numpy()
    exact = xb.T @ xb  # products of bf16 values are exact in float64, sums within 1e-16
    mass = np.abs(xb).T @ np.abs(xb)
    u = 2.0**-24
    gamma = n * u / (1 - n * u)
    assert np.all(np.abs(got - exact) <= gamma * mass + 1e-300)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 400), d=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_exact_on_small_integers(n, d, seed):
    """Every partial sum is an integer below 2^24: the result is the exact sum, whatever the
    order, so a misplaced or dropped product shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 17, (n, d), generator=g)
    got = _native.gram_bf16(_bits(x.float()))
    want = (x.T.long() @ x.long()).numpy()
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="contiguous"):
        _native.gram_bf16(np.zeros((4, 6), np.uint16)[:, ::2])
    with pytest.raises(TypeError):
        _native.gram_bf16(np.zeros((4, 6), np.float32))
