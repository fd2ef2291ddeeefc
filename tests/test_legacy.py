"""The legacy ggml formats q4_0 q4_1 q5_0 q5_1 q8_0: without an imatrix byte for byte against
both gguf-py's numpy quantizers and libggml's `ggml_quantize_chunk`; with an imatrix against
libggml (its `quantize_row_*_impl`; q8_0 ignores the imatrix); dequantization bit for bit against
gguf-py and libggml; and properties (derived error bounds, zero blocks, sign symmetry where the
format is symmetric, thread count, 16-bit inputs, imatrix scale invariance)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ferroquant as fq

import peers
from data import DISTRIBUTIONS, make
from peers import check_bytes, same_bits

QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
WEIGHTED = ("q4_0", "q4_1", "q5_0", "q5_1")  # the ones with an importance-weighted quantizer
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
SHAPES = ((1, 32), (3, 96), (8, 512), (5, 1024))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def imatrix_for(cols: int, seed: int) -> np.ndarray:
    """Importance values like llama.cpp's (non-negative, spread over decades), some exactly 0."""
    rng = np.random.default_rng(20_000 + seed)
    w = rng.gamma(0.5, 2.0, cols) * 10.0 ** rng.uniform(-2, 2)
    w[rng.random(cols) < 0.05] = 0.0
    return w.astype(np.float32)


def gguf_quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    return peers.gguf_quants().quantize(x, peers.gguf_qtype(qtype))


# ---------------------------------------------------------------------------------------------
# Cross-checks against the peers


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_matches_gguf_py_and_libggml(qtype, dist):
    for rows, cols in SHAPES:
        for seed in (0, 1):
            x = make(dist, rows, cols, seed)
            what = f"{dist} {rows}x{cols} seed {seed}"
            ours = fq.quantize(x, qtype).data
            check_bytes(ours, gguf_quantize(x, qtype), qtype, what + " vs gguf-py")
            check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, what + " vs libggml")


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_imatrix_quantize_matches_libggml(qtype, dist):
    for rows, cols in SHAPES:
        for seed in (0, 1):
            x = make(dist, rows, cols, seed)
            w = imatrix_for(cols, seed)
            ours = fq.quantize(x, qtype, w).data
            what = f"{dist} {rows}x{cols} seed {seed} with imatrix"
            check_bytes(ours, peers.ggml_quantize(x, qtype, w), qtype, what)
            # the imatrix is used: the weighted result is not the plain one
            if dist not in ("zero_and_constant_blocks",) and rows * cols >= 512:
                assert not np.array_equal(ours, fq.quantize(x, qtype).data)


def test_q8_0_ignores_the_imatrix_as_ggml_does():
    x = make("heavy_tailed", 6, 512, 3)
    w = imatrix_for(512, 3)
    plain = fq.quantize(x, "q8_0").data
    check_bytes(fq.quantize(x, "q8_0", w).data, plain, "q8_0", "with vs without imatrix")
    check_bytes(plain, peers.ggml_quantize(x, "q8_0", w), "q8_0", "vs libggml with imatrix")
    check_bytes(plain, gguf_quantize(x, "q8_0"), "q8_0", "vs gguf-py")


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    dist=st.sampled_from(DISTRIBUTIONS),
    rows=st.integers(1, 4),
    nblocks=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_matches_both_peers_on_fresh_data(qtype, dist, rows, nblocks, seed):
    x = make(dist, rows, 32 * nblocks, seed)
    ours = fq.quantize(x, qtype).data
    check_bytes(ours, gguf_quantize(x, qtype), qtype, dist + " vs gguf-py")
    check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, dist + " vs libggml")
    w = imatrix_for(32 * nblocks, seed)
    check_bytes(fq.quantize(x, qtype, w).data, peers.ggml_quantize(x, qtype, w), qtype, dist)


# Arbitrary values: repeated values, exact zeros, signed zeros, ties of |max|, subnormals, mixed
# magnitudes up to the float16 range that ferroquant accepts for formats with float16 scales
# (larger inputs raise QuantizeError: test_api.py).
SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-20, 65504.0, -65504.0])
ARBITRARY = st.floats(-65504.0, 65504.0, width=32) | SPECIAL


def inverse_scale_overflows(x: np.ndarray, qtype: str) -> bool:
    """Whether some block's plain scale d is so small (|d| < 1/FLT_MAX, block amax below about
    1e-37) that ggml's id = 1/d is infinite: see test_blocks_whose_inverse_scale_overflows."""
    b = x.reshape(-1, 32)
    if qtype in ("q4_1", "q5_1"):
        d = (b.max(axis=1) - b.min(axis=1)) / np.float32(15 if qtype == "q4_1" else 31)
    else:
        d = np.abs(b).max(axis=1) / np.float32({"q4_0": 8, "q5_0": 16, "q8_0": 127}[qtype])
    with np.errstate(all="ignore"):
        return bool(np.any((d != 0) & ~np.isfinite(np.float32(1) / d)))


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(64)), elements=ARBITRARY),
    w=hnp.arrays(np.float32, 64, elements=st.floats(0, 1e6, width=32)),
)
def test_quantize_matches_both_peers_on_arbitrary_arrays(qtype, x, w):
    if qtype == "q8_0":  # q8_0 ignores the imatrix: its weighted path is the plain one
        assume(not inverse_scale_overflows(x, qtype))
    check_bytes(fq.quantize(x, qtype, w).data, peers.ggml_quantize(x, qtype, w), qtype, "imatrix")
    assume(not inverse_scale_overflows(x, qtype))  # the known case below
    ours = fq.quantize(x, qtype).data
    check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, "vs libggml")
    with np.errstate(all="ignore"):
        ref = gguf_quantize(x, qtype)
    check_bytes(zero_signs_cleared(ours, qtype), zero_signs_cleared(ref, qtype), qtype, "gguf-py")


def zero_signs_cleared(data: np.ndarray, qtype: str) -> np.ndarray:
    """The bytes with every f16 scale (and minimum) of -0.0 replaced by +0.0: gguf-py and
    libggml disagree on the sign of a zero scale or minimum (see the two tests below)."""
    b = data.reshape(-1, BLOCK_BYTES[qtype]).copy()
    for off in (0, 2) if qtype in ("q4_1", "q5_1") else (0,):
        h = b[:, off : off + 2].copy().view(np.uint16)
        h[h == 0x8000] = 0
        b[:, off : off + 2] = h.view(np.uint8)
    return b.reshape(-1)


@pytest.mark.parametrize("qtype", ["q4_0", "q5_0"])
def test_all_zero_blocks_starting_with_negative_zero(qtype):
    """A known difference between the peers. ggml starts its search for the signed extreme from
    max = +0.0 and only replaces it on a strictly larger |v|, so a block of zeros keeps
    max = +0.0 and stores d = 0.0/-nmax = -0.0 (f16 0x8000). gguf-py takes the element at
    argmax(|x|), the first one, so a block starting with -0.0 gets d = -0.0/-nmax = +0.0. We
    follow libggml, which defines the format (the decoded values are zeros either way)."""
    x = np.zeros((1, 64), np.float32)
    x[0, 0] = -0.0
    x[0, 32:] = -0.0
    ours, lib = fq.quantize(x, qtype).data, peers.ggml_quantize(x, qtype)
    check_bytes(ours, lib, qtype, "vs libggml")
    gguf = gguf_quantize(x, qtype).reshape(-1, BLOCK_BYTES[qtype])
    lib = lib.reshape(-1, BLOCK_BYTES[qtype])
    assert list(lib[:, 1]) == [0x80, 0x80] and list(gguf[:, 1]) == [0x00, 0x00]
    assert np.array_equal(gguf[:, 2:], lib[:, 2:])
    assert np.all(fq.dequantize(fq.quantize(x, qtype)) == 0)


@pytest.mark.parametrize("qtype", ["q4_1", "q5_1"])
def test_minimum_of_mixed_signed_zeros(qtype):
    """The other known difference: ggml's minimum is the first of equal values
    (`if (v < min) min = v`), so with +0.0 before -0.0 (and nothing negative) m = +0.0. numpy's
    `min` (gguf-py) returns one or the other zero depending on their positions (its reduction
    is vectorised). We follow libggml; the rest of the block is identical."""
    differs = 0
    for i, j in ((0, 1), (5, 9), (3, 20), (16, 31)):
        x = np.abs(make("normal", 1, 32, i))
        x[0, i], x[0, j] = 0.0, -0.0
        ours, lib = fq.quantize(x, qtype).data, peers.ggml_quantize(x, qtype)
        check_bytes(ours, lib, qtype, f"zeros at {i}, {j} vs libggml")
        gguf = gguf_quantize(x, qtype).reshape(-1)
        assert list(lib[2:4]) == [0x00, 0x00] and list(gguf[2:4]) in ([0, 0], [0, 0x80])
        assert np.array_equal(np.delete(gguf, [2, 3]), np.delete(lib, [2, 3]))
        differs += list(gguf[2:4]) != [0, 0]
    assert differs > 0


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_whose_inverse_scale_overflows(qtype):
    """A block of values near FLT_MIN: d = amax/nmax (or range/levels) is subnormal, 1/d = inf,
    every x*id is +-inf and the peers store level 0 for each (gguf-py agrees with libggml)."""
    x = np.full((1, 64), 1.1754944e-38, np.float32)
    x[0, 3], x[0, 5] = 4e-39, -6e-39
    assert inverse_scale_overflows(x, qtype)
    ref = peers.ggml_quantize(x, qtype)
    with np.errstate(all="ignore"):
        check_bytes(ref, gguf_quantize(x, qtype), qtype, "gguf-py vs libggml")
    check_bytes(fq.quantize(x, qtype).data, ref, qtype, "vs libggml")


def _ggml_dequantize(qtype: str, data: np.ndarray, n: int) -> np.ndarray:
    fn = getattr(peers.libggml(), f"dequantize_row_{qtype}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    y = np.zeros(n, np.float32)
    fn(data.ctypes.data, y.ctypes.data, n)
    return y


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_gguf_py_and_libggml(qtype):
    t = peers.gguf_qtype(qtype)
    for dist in DISTRIBUTIONS:
        for rows, cols in SHAPES:
            x = make(dist, rows, cols, seed=7)
            for w in (None, imatrix_for(cols, 7)):
                qt = fq.quantize(x, qtype, w)
                ours = fq.dequantize(qt)
                ref = peers.gguf_quants().dequantize(qt.data.reshape(rows, -1), t)
                assert same_bits(ours, ref), (qtype, dist, rows, cols, w is not None)
                lib = _ggml_dequantize(qtype, qt.data, rows * cols)
                assert same_bits(ours, lib), (qtype, dist, rows, cols, w is not None)


@SETTINGS
@given(qtype=st.sampled_from(QTYPES), nblocks=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_dequantize_of_arbitrary_bytes_matches_gguf_py(qtype, nblocks, seed):
    """Every level and bit pattern, including f16 scales that are subnormal, inf or NaN."""
    data = np.random.default_rng(seed).integers(0, 256, nblocks * BLOCK_BYTES[qtype], np.uint8)
    ours = fq.dequantize(fq.QTensor(qtype, (32 * nblocks,), data, 32))
    with np.errstate(all="ignore"):
        ref = peers.gguf_quants().dequantize(data, peers.gguf_qtype(qtype))
    lib = _ggml_dequantize(qtype, data, 32 * nblocks)
    assert np.array_equal(ours, ref, equal_nan=True) and np.array_equal(ours, lib, equal_nan=True)
    finite = np.isfinite(ref)
    assert same_bits(ours[finite], ref[finite]) and same_bits(ours[finite], lib[finite])


# ---------------------------------------------------------------------------------------------
# Properties


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float64).reshape(-1)


def _f16_err(d: np.ndarray) -> np.ndarray:
    """Bound on |v - D| when D = f16(v) (round to nearest): half an ulp of D, i.e. |D| * 2^-11
    for normal halves and 2^-25 in the subnormal range."""
    return np.maximum(np.abs(d) * 2.0**-11, 2.0**-25)


def error_bound(qtype: str, x: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per-element bound on |x - dequantize(quantize(x))| for the plain (no imatrix) quantizers,
    derived from ggml's `quantize_row_*_ref`. Per block of 32, with D (and M) the stored f16
    scale (and minimum) and e = _f16_err(D) >= |d - D|:

    q4_0: d = max/-8, levels -8..7, q = trunc(x/d + 8.5) clamped to 15: x/d lies in [-8, 8], so
          rounding is to the nearest level (error <= |d|/2) except for x/d > 7.5, which is
          clamped to 7 (error <= |d|); that only happens for |x| > 15/16 amax.
          Dequantizing with D adds |q| |d - D| <= 8 e.  Total |d|/2 or |d|, + 8 e.
    q5_0: the same with 16 levels a side: |d|/2, or |d| for |x| > 31/32 amax; + 16 e.
    q8_0: d = amax/127, q = roundf(x/d) in [-127, 127]: |d|/2 + 127 e.
    q4_1: d = (max - min)/15, q = trunc((x - min)/d + 0.5) in 0..15 (never clamped):
          |d|/2 + 15 e + |min - M|.   q5_1: the same with 31.
    |d| <= |D| + e; and 2^-20 relative to the magnitudes involved for f32 rounding.
    """
    rows, cols = x.shape
    b = data.reshape(-1, BLOCK_BYTES[qtype])
    xb = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    D = _f16(b[:, :2]).reshape(-1, 1)
    e = _f16_err(D)
    d = np.abs(D) + e
    if qtype in ("q4_0", "q5_0"):
        nmax = 8 if qtype == "q4_0" else 16
        clamp_zone = np.abs(xb) > (1 - 1 / (2 * nmax) - 1e-4) * amax
        bound = np.where(clamp_zone, d, d / 2) + nmax * e
    elif qtype == "q8_0":
        bound = d / 2 + 127 * e + 0 * xb
    else:
        M = _f16(b[:, 2:4]).reshape(-1, 1)
        levels = 15 if qtype == "q4_1" else 31
        bound = d / 2 + levels * e + _f16_err(M) + 0 * xb
    bound = bound + 2.0**-20 * (np.abs(xb) + 2 * amax + levels_max(qtype) * d)
    return bound.reshape(rows, cols)


def levels_max(qtype: str) -> int:
    return {"q4_0": 8, "q4_1": 15, "q5_0": 16, "q5_1": 31, "q8_0": 127}[qtype]


VALUES = st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, 1e-3, -7.5, 1e-7])


def matrices():
    return hnp.arrays(
        np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 256])), elements=VALUES
    )


@SETTINGS
@given(qtype=st.sampled_from(QTYPES), x=matrices())
def test_round_trip_error_is_within_the_derived_bound(qtype, x):
    qt = fq.quantize(x, qtype)
    err = np.abs(fq.dequantize(qt).astype(np.float64) - x)
    bound = error_bound(qtype, x, qt.data)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (qtype, x.reshape(-1)[worst], err.reshape(-1)[worst])


@pytest.mark.parametrize("qtype", QTYPES)
def test_the_bound_is_tight_enough_to_mean_something(qtype):
    x = make("normal", 8, 512, 3)
    qt = fq.quantize(x, qtype)
    err = np.abs(fq.dequantize(qt) - x)
    bound = error_bound(qtype, x, qt.data)
    assert np.all(err <= bound)
    amax = np.repeat(np.abs(x).reshape(-1, 32).max(axis=1), 32).reshape(x.shape)
    # about half a step: amax/16 (q4_0), amax/32 (q5_0), amax/254 (q8_0), range/30, range/62
    limit = {"q4_0": 0.07, "q5_0": 0.035, "q8_0": 0.0045, "q4_1": 0.075, "q5_1": 0.037}
    assert np.median(bound / amax) < limit[qtype]
    # and most errors are well inside it (a quantizer off by a level would not be)
    assert np.mean(err <= 0.5 * bound) > 0.4


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("use_imatrix", [False, True])
def test_zero_and_negligible_blocks_dequantize_to_zero(qtype, use_imatrix):
    x = make("normal", 4, 256, 5)
    x[0, :32] = 0.0
    x[1, 96:160] = -0.0
    x[2, :] = 0.0
    x[3, 64:96] = 1e-16  # below ggml's GROUP_MAX_EPS (1e-15) in the weighted quantizers
    w = imatrix_for(256, 5) if use_imatrix else None
    y = fq.dequantize(fq.quantize(x, qtype, w))
    for r, sl in ((0, slice(0, 32)), (1, slice(96, 160)), (2, slice(None))):
        assert np.all(y[r, sl] == 0.0), (r, sl)
    if use_imatrix and qtype in WEIGHTED:
        assert np.all(y[3, 64:96] == 0.0)
    else:  # the plain quantizers keep even such tiny blocks (within f16 range: here they flush)
        assert np.all(np.abs(y[3, 64:96]) <= 1e-15)


# Exactly symmetric: q4_0, q5_0 (d = max/-nmax flips sign with max, x*id is unchanged; with an
# imatrix every candidate iscale and least-squares scale flips sign, the levels are unchanged)
# and q8_0 (roundf is odd). Not symmetric: q4_1, q5_1 (levels count up from the minimum; -x
# swaps the roles of min and max and rounds half up on the other side).
SYMMETRIC = ("q4_0", "q5_0", "q8_0")


@SETTINGS
@given(qtype=st.sampled_from(SYMMETRIC), x=matrices(), use_imatrix=st.booleans())
def test_negating_the_input_negates_the_output_for_symmetric_formats(qtype, x, use_imatrix):
    w = imatrix_for(x.shape[1], 2) if use_imatrix else None
    a, b = fq.quantize(x, qtype, w), fq.quantize(-x, qtype, w)
    assert np.array_equal(fq.dequantize(b), -fq.dequantize(a))


@pytest.mark.parametrize("qtype", ["q4_1", "q5_1"])
@pytest.mark.parametrize("use_imatrix", [False, True])
def test_formats_with_a_minimum_are_not_symmetric(qtype, use_imatrix):
    x = make("normal", 8, 256, 6)
    w = imatrix_for(256, 6) if use_imatrix else None
    a, b = fq.dequantize(fq.quantize(x, qtype, w)), fq.dequantize(fq.quantize(-x, qtype, w))
    assert not np.array_equal(b, -a)
    # ...but both are good approximations of their inputs
    assert np.sqrt(np.mean((b + a) ** 2)) < 0.2 * np.sqrt(np.mean(x**2))


@pytest.mark.parametrize("qtype", QTYPES)
def test_results_do_not_depend_on_the_thread_count(qtype):
    x = make("outliers", 64, 1024, 11)
    w = imatrix_for(1024, 11)
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        one = [fq.quantize(x, qtype).data, fq.quantize(x, qtype, w).data]
        y1 = fq.dequantize(fq.quantize(x, qtype, w))
        fq.set_num_threads(2)
        two = [fq.quantize(x, qtype).data, fq.quantize(x, qtype, w).data]
        y2 = fq.dequantize(fq.quantize(x, qtype, w))
    finally:
        fq.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert same_bits(y1, y2)


@pytest.mark.parametrize("qtype", QTYPES)
def test_16_bit_inputs_quantize_like_their_float32_upcast(qtype):
    ml_dtypes = peers.require("ml_dtypes")
    torch = peers.require("torch")
    x = make("heavy_tailed", 6, 256, 4)
    w = imatrix_for(256, 4)
    for low in (x.astype(np.float16), x.astype(ml_dtypes.bfloat16)):
        up = low.astype(np.float32)
        for imat in (None, w):
            ours, ref = fq.quantize(low, qtype, imat).data, fq.quantize(up, qtype, imat).data
            assert np.array_equal(ours, ref), (low.dtype, imat is not None)
    tb = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(fq.quantize(tb, qtype, w).data, fq.quantize(tb.float(), qtype, w).data)


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_imatrix_scale_does_not_matter(qtype):
    """Only ratios of weights enter ggml's choices (score comparisons and least-squares fits),
    so multiplying the imatrix by a power of two gives identical bytes."""
    x = make("normal", 4, 256, 9)
    w = imatrix_for(256, 9)
    base = fq.quantize(x, qtype, w).data
    for k in (2.0**-6, 4.0, 2.0**10):
        assert np.array_equal(fq.quantize(x, qtype, w * np.float32(k)).data, base)
