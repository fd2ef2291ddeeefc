"""iq4_nl and iq4_xs: quantization byte for byte against libggml's `ggml_quantize_chunk` (with and
without an imatrix), dequantization bit for bit against gguf-py and libggml's
`dequantize_row_iq4_*`, and properties (derived error bound, zero blocks, sign symmetry, thread
count, 16-bit inputs, imatrix scale invariance)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ferroquant as fq

import peers
from data import DISTRIBUTIONS, make
from peers import check_bytes, same_bits

QTYPES = ("iq4_nl", "iq4_xs")
BLOCK_BYTES = {"iq4_nl": 18, "iq4_xs": 136}
SUPER = {"iq4_nl": 32, "iq4_xs": 256}
SHAPES = ((1, 256), (5, 512), (12, 1024))
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def imatrix_for(cols: int, seed: int) -> np.ndarray:
    """Importance values like llama.cpp's (non-negative, spread over decades), some exactly 0."""
    rng = np.random.default_rng(10_000 + seed)
    w = rng.gamma(0.5, 2.0, cols) * 10.0 ** rng.uniform(-2, 2)
    w[rng.random(cols) < 0.05] = 0.0
    return w.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cross-checks against the peers


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_matches_libggml(qtype, dist):
    for rows, cols in SHAPES:
        for seed in (0, 1):
            x = make(dist, rows, cols, seed)
            for w in (None, imatrix_for(cols, seed)):
                what = f"{dist} {rows}x{cols} seed {seed} imatrix {w is not None}"
                ours = fq.quantize(x, qtype, w).data
                check_bytes(ours, peers.ggml_quantize(x, qtype, w), qtype, what)


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    dist=st.sampled_from(DISTRIBUTIONS),
    rows=st.integers(1, 4),
    nsuper=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    use_imatrix=st.booleans(),
)
def test_quantize_matches_libggml_on_fresh_data(qtype, dist, rows, nsuper, seed, use_imatrix):
    cols = 256 * nsuper
    x = make(dist, rows, cols, seed)
    w = imatrix_for(cols, seed) if use_imatrix else None
    check_bytes(fq.quantize(x, qtype, w).data, peers.ggml_quantize(x, qtype, w), qtype, dist)


# Arbitrary values: repeated values, exact zeros, mixed magnitudes, subnormals, up to the float16
# range that ferroquant accepts for formats with float16 scales (larger inputs raise
# QuantizeError: test_api.py).
SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-20, 65504.0, -65504.0])
ARBITRARY = st.floats(-65504.0, 65504.0, width=32) | SPECIAL


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(256)), elements=ARBITRARY),
    w=st.none() | hnp.arrays(np.float32, 256, elements=st.floats(0, 1e6, width=32)),
)
def test_quantize_matches_libggml_on_arbitrary_arrays(qtype, x, w):
    check_bytes(fq.quantize(x, qtype, w).data, peers.ggml_quantize(x, qtype, w), qtype, "")


def _ggml_dequantize(qtype: str, data: np.ndarray, n: int) -> np.ndarray:
    lib = peers.libggml()
    fn = getattr(lib, f"dequantize_row_{qtype}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    y = np.zeros(n, np.float32)
    fn(data.ctypes.data, y.ctypes.data, n)
    return y


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_gguf_py_and_libggml(qtype):
    gq = peers.gguf_quants()
    t = peers.gguf_qtype(qtype)
    for dist in DISTRIBUTIONS:
        for rows, cols in SHAPES:
            x = make(dist, rows, cols, seed=7)
            qt = fq.quantize(x, qtype, imatrix_for(cols, 7) if rows > 1 else None)
            ours = fq.dequantize(qt)
            ref = gq.dequantize(qt.data.reshape(rows, -1), t)
            assert same_bits(ours, ref), (qtype, dist, rows, cols)
            assert same_bits(ours, _ggml_dequantize(qtype, qt.data, rows * cols)), (qtype, dist)


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    nblocks=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_dequantize_of_arbitrary_bytes_matches_gguf_py(qtype, nblocks, seed):
    """Every scale and index pattern, including f16 scales that are subnormal, inf or NaN."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, nblocks * BLOCK_BYTES[qtype], dtype=np.uint8)
    cols = nblocks * SUPER[qtype]
    ours = fq.dequantize(fq.QTensor(qtype, (cols,), data, SUPER[qtype]))
    with np.errstate(all="ignore"):  # NaN scales times zero
        ref = peers.gguf_quants().dequantize(data, peers.gguf_qtype(qtype))
    lib = _ggml_dequantize(qtype, data, cols)
    assert np.array_equal(ours, ref, equal_nan=True)
    assert np.array_equal(ours, lib, equal_nan=True)
    finite = np.isfinite(ref)
    assert same_bits(ours[finite], ref[finite]) and same_bits(ours[finite], lib[finite])


# ---------------------------------------------------------------------------------------------
# Properties


def _f16_err(d: np.ndarray) -> np.ndarray:
    """Bound on |s - D| when D = f16(s) (round to nearest): half an ulp of D, i.e. |D| * 2^-11
    for normal halves and 2^-25 in the subnormal range."""
    return np.maximum(np.abs(d) * 2.0**-11, 2.0**-25)


def decode_scales(qtype: str, data: np.ndarray, rows: int, cols: int) -> tuple:
    """Per element: the stored f16 scale D and the integer block multiplier l (1 for iq4_nl,
    the 6-bit `ls - 32` for iq4_xs), so that y = (D * l) * kvalues[q]."""
    b = data.reshape(-1, BLOCK_BYTES[qtype])
    d = b[:, :2].copy().view(np.float16).astype(np.float64).reshape(-1)
    if qtype == "iq4_nl":
        return np.repeat(d, 32).reshape(rows, cols), np.ones((rows, cols))
    sh = b[:, 2:4].copy().view(np.uint16).reshape(-1, 1).astype(np.int64)
    sl = b[:, 4:8].astype(np.int64)
    ib = np.arange(8)
    ls = ((sl[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
    return (
        np.repeat(d, 256).reshape(rows, cols),
        np.repeat(ls - 32, 32, axis=1).reshape(rows, cols),
    )


def error_bound(qtype: str, x: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per-element bound on |x - dequantize(quantize(x))|, derived from the algorithm.

    Every index is (re)computed as the table entry nearest to x / s, where s is the f32 block
    scale (iq4_nl: the fitted scale, stored as D = f16(s); iq4_xs: d * l, with d the f32 super
    scale stored as D = f16(d) and l the stored 6-bit block multiplier). Hence
      |x - k*s| <= 12 |s|                    inside the table (largest half gap (113 - 89) / 2),
      |x - k*s| <= |x| - 113 |s|             beyond its ends (|x| > 113 |s|),
    so |x - k*s| <= 12 |s| + max(0, |x| - 113 |s|). Dequantization uses D * l instead of s:
    another |k| * |l| * |d - D| <= 127 |l| e, e = _f16_err(D). With |d| in [|D| - e, |D| + e]
    and a 2^-20 relative allowance for f32 rounding of x / s and of the products:
    """
    D, mult = decode_scales(qtype, data, *x.shape)
    e = _f16_err(D)
    al = np.abs(mult)
    s_hi = al * (np.abs(D) + e)
    s_lo = al * np.maximum(np.abs(D) - e, 0.0)
    ax = np.abs(x.astype(np.float64))
    return (
        12 * s_hi + np.maximum(0.0, ax - 113 * s_lo) + 127 * al * e + 2.0**-20 * (ax + 127 * s_hi)
    )


VALUES = st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, 1e-3, -7.5])


def matrices(cols: int = 256):
    return hnp.arrays(
        np.float32, st.tuples(st.integers(1, 3), st.sampled_from([cols, 2 * cols])), elements=VALUES
    )


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES), x=matrices(), use_imatrix=st.booleans(), seed=st.integers(0, 99)
)
def test_round_trip_error_is_within_the_derived_bound(qtype, x, use_imatrix, seed):
    w = imatrix_for(x.shape[1], seed) if use_imatrix else None
    qt = fq.quantize(x, qtype, w)
    y = fq.dequantize(qt).astype(np.float64)
    err = np.abs(y - x)
    bound = error_bound(qtype, x, qt.data)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (qtype, x.reshape(-1)[worst], y.reshape(-1)[worst])


@pytest.mark.parametrize("qtype", QTYPES)
def test_the_bound_is_tight_enough_to_mean_something(qtype):
    """On normal data the bound is a fraction of the values, the error stays below it, and every
    output is a table value times the decoded block scale."""
    x = make("normal", 8, 1024, 3)
    qt = fq.quantize(x, qtype)
    y = fq.dequantize(qt)
    err = np.abs(y - x)
    bound = error_bound(qtype, x, qt.data)
    assert np.all(err <= bound)
    # 12 |s| with |s| about amax / 113..127 of the block: about a tenth of the block's amax
    amax = np.repeat(np.abs(x).reshape(-1, 32).max(axis=1), 32).reshape(x.shape)
    assert np.median(bound / amax) < 0.13
    # and the quantizer is not trivial: relative RMS error of a 4-bit code, well below 15%
    assert np.sqrt(np.mean(err**2) / np.mean(x**2)) < 0.15
    D, mult = decode_scales(qtype, qt.data, *x.shape)
    k = y / (D * mult)
    assert np.all(np.isin(np.rint(k), KVALUES)) and np.allclose(k, np.rint(k), atol=1e-3)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("use_imatrix", [False, True])
def test_zero_and_negligible_blocks_dequantize_to_zero(qtype, use_imatrix):
    x = make("normal", 4, 512, 5)
    x[0, :32] = 0.0
    x[1, 256:] = 0.0  # a whole iq4_xs super-block
    x[2, 64:96] = 1e-16  # below ggml's GROUP_MAX_EPS (1e-15): treated as zero
    x[3, :] = 0.0
    w = imatrix_for(512, 5) if use_imatrix else None
    qt = fq.quantize(x, qtype, w)
    y = fq.dequantize(qt)
    for r, sl in ((0, slice(0, 32)), (1, slice(256, 512)), (2, slice(64, 96)), (3, slice(None))):
        assert np.all(y[r, sl] == 0.0), (r, sl)
    # the table has no 0, so every block with a nonzero scale has no zero output
    assert np.all(y[0, 32:] != 0)


@SETTINGS
@given(qtype=st.sampled_from(QTYPES), x=matrices(), use_imatrix=st.booleans())
def test_negating_the_input_negates_the_output(qtype, x, use_imatrix):
    """Symmetric although the table is not: -x gives the same indices and a negated scale (the
    first guess -max/kvalues[0], every candidate (itry + kvalues[0])/max and every least-squares
    fit flip sign with max; the index arguments id*x are unchanged)."""
    w = imatrix_for(x.shape[1], 1) if use_imatrix else None
    a, b = fq.quantize(x, qtype, w), fq.quantize(-x, qtype, w)
    assert np.array_equal(fq.dequantize(b), -fq.dequantize(a))
    qa = a.data.reshape(-1, BLOCK_BYTES[qtype])
    qb = b.data.reshape(-1, BLOCK_BYTES[qtype])
    assert np.array_equal(qa[:, 2:], qb[:, 2:])  # same indices (and iq4_xs block scales)
    # d flips sign (compared as numbers: a scale of 0, e.g. for all-zero blocks or when the
    # only nonzero values have zero importance, may keep or flip the sign of its zero)
    da = qa[:, :2].copy().view(np.float16).reshape(-1)
    db = qb[:, :2].copy().view(np.float16).reshape(-1)
    assert np.array_equal(db, -da)


@pytest.mark.parametrize("qtype", QTYPES)
def test_results_do_not_depend_on_the_thread_count(qtype):
    x = make("heavy_tailed", 64, 1024, 11)
    w = imatrix_for(1024, 11)
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        one = [fq.quantize(x, qtype).data, fq.quantize(x, qtype, w).data]
        y1 = fq.dequantize(fq.quantize(x, qtype))
        fq.set_num_threads(2)
        two = [fq.quantize(x, qtype).data, fq.quantize(x, qtype, w).data]
        y2 = fq.dequantize(fq.quantize(x, qtype))
    finally:
        fq.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert same_bits(y1, y2)


@pytest.mark.parametrize("qtype", QTYPES)
def test_16_bit_inputs_quantize_like_their_float32_upcast(qtype):
    ml_dtypes = peers.require("ml_dtypes")
    torch = peers.require("torch")
    x = make("outliers", 6, 512, 4)
    w = imatrix_for(512, 4)
    for low in (x.astype(np.float16), x.astype(ml_dtypes.bfloat16)):
        up = low.astype(np.float32)
        for imat in (None, w):
            assert np.array_equal(
                fq.quantize(low, qtype, imat).data, fq.quantize(up, qtype, imat).data
            )
    tb = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(fq.quantize(tb, qtype).data, fq.quantize(tb.float(), qtype).data)


@pytest.mark.parametrize("qtype", QTYPES)
def test_imatrix_scale_does_not_matter(qtype):
    """Only ratios of weights enter ggml's choices (sumqx^2 / sumq2 comparisons, sumqx / sumq2
    fits), so multiplying the imatrix by a power of two gives identical bytes."""
    x = make("normal", 4, 512, 9)
    w = imatrix_for(512, 9)
    base = fq.quantize(x, qtype, w).data
    for k in (2.0**-6, 4.0, 2.0**10):
        assert np.array_equal(fq.quantize(x, qtype, w * np.float32(k)).data, base)
    # ...while a different weighting does change the result
    assert not np.array_equal(fq.quantize(x, qtype).data, base)
