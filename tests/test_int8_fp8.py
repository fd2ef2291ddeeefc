"""int8 and fp8 against the torch expressions that define them (see int8.rs and fp8.rs).

int8:  scale = amax / 127; q = round(x / where(scale == 0, 1, scale)).clamp(-127, 127).to(int8)
fp8:   scale = amax / fmax, 1 where that is 0; q = (x / scale).to(float8_e4m3fn / float8_e5m2)
both:  x' = q.to(float32) * scale, amax over the tensor, each row, or each block of the row,
       on the input converted to float32.
Bytes, scales and dequantized values are compared bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ferroquant as fq

import data
import peers

torch = peers.require("torch")

QTYPES = ("int8", "fp8_e4m3", "fp8_e5m2")
MODES = ("tensor", "row", "block")
FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def same_floats(a, b) -> bool:
    """Bitwise equal, except that any NaN equals any NaN."""
    a, b = np.asarray(a, np.float32).reshape(-1), np.asarray(b, np.float32).reshape(-1)
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and np.array_equal(bits(a[~nan]), bits(b[~nan])))


def torch_reference(x, qtype: str, mode: str, bs: int):
    """(bytes, scales, dequantized) by the defining torch expression."""
    xf = x.float()
    groups = {"tensor": xf.reshape(1, -1), "row": xf, "block": xf.reshape(-1, bs)}[mode]
    amax = groups.abs().amax(dim=-1, keepdim=True)
    if qtype == "int8":
        scale = amax / 127
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(groups / safe).clamp(-127, 127).to(torch.int8)
    else:
        dtype, fmax = FP8[qtype]
        scale = amax / fmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (groups / scale).to(dtype)
    y = q.to(torch.float32) * scale
    return q.view(torch.uint8).reshape(-1).numpy(), scale.reshape(-1).numpy(), y.numpy()


def check(x, qtype: str, mode: str, bs: int = 64, what: str = "") -> fq.QTensor:
    rows, cols = x.shape[0] if x.dim() > 1 else 1, x.shape[-1]
    q, scales, y = torch_reference(x.reshape(-1, cols), qtype, mode, bs)
    ours = fq.quantize(x, qtype, scale_mode=mode, block_size=bs if mode == "block" else None)
    assert ours.scale_mode == mode
    assert ours.block_size == {"tensor": rows * cols, "row": cols, "block": bs}[mode]
    assert np.array_equal(ours.data, q), what + ": " + peers.first_difference(ours.data, q, cols)
    assert np.array_equal(bits(ours.scales), bits(scales)), what
    assert same_floats(fq.dequantize(ours), y), what
    return ours


@pytest.mark.parametrize("dist", data.DISTRIBUTIONS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_torch(dist, qtype):
    for k, (rows, cols) in enumerate([(16, 256), (3, 1024), (1, 64), (7, 192)]):
        x32 = data.make(dist, rows, cols, seed=k + 10 * len(dist))
        for mode in MODES:
            for name, dt in DTYPES.items():
                check(torch.from_numpy(x32).to(dt), qtype, mode, 64, f"{dist} {mode} {name}")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", list(NP_DTYPES))
def test_numpy_inputs(qtype, dtype):
    x32 = data.make("outliers", 8, 512, seed=3)
    xn, xt = x32.astype(NP_DTYPES[dtype]), torch.from_numpy(x32).to(DTYPES[dtype])
    for mode in MODES:
        bs = 128 if mode == "block" else None
        ours = fq.quantize(xn, qtype, scale_mode=mode, block_size=bs)
        q, scales, _ = torch_reference(xt, qtype, mode, 128)
        assert np.array_equal(ours.data, q) and np.array_equal(bits(ours.scales), bits(scales))


@pytest.mark.parametrize("qtype", ("fp8_e4m3", "fp8_e5m2"))
def test_fp8_cast_sweep(qtype):
    """Every row holds fmax, so the scale is exactly 1 and the bytes are torch's cast of the
    values themselves: a sweep over the float32 bit patterns below fmax (all exponents, the
    rounding bits around every fp8 step, ties included) plus their negatives."""
    fmax = np.float32(FP8[qtype][1])
    hi = np.arange(0, int(bits(fmax)[0]) >> 12, dtype=np.uint32) << 12
    low = np.array([0, 1, 0x7FF, 0x800, 0x801, 0xFFF], np.uint32)
    pats = (hi[:, None] | low[None, :]).reshape(-1)
    vals = pats.view(np.float32)
    vals = vals[vals <= fmax]
    cols = 1024
    vals = np.concatenate([vals, -vals])
    vals = np.concatenate([vals, np.zeros(-len(vals) % (cols - 1), np.float32)])
    x = np.concatenate([vals.reshape(-1, cols - 1), np.full((len(vals) // (cols - 1), 1), fmax)], 1)
    check(torch.from_numpy(np.ascontiguousarray(x, np.float32)), qtype, "row", what="sweep")


@pytest.mark.parametrize("qtype", QTYPES)
def test_subnormal_scales_and_overflow(qtype):
    """amax so small that amax / fmax is a subnormal float32 with few bits: x / scale then lands
    past fmax (e4m3fn: NaN, e5m2: the largest value or infinity) or the scale underflows to 0
    (int8: scale 0 stores 0; fp8: scale 1). Whatever torch does, we do."""
    tiny = np.float32(2.0**-149)
    rows = [
        np.float32(k) * tiny * np.linspace(-1, 1, 64, dtype=np.float32) for k in range(1, 1500, 7)
    ]
    x = np.stack(rows).astype(np.float32)
    for mode in MODES:
        check(torch.from_numpy(x), qtype, mode, 32, what=f"subnormal {mode}")


def test_zero_groups():
    x = np.zeros((3, 64), np.float32)
    x[2, 32:] = 1.5
    for qtype in QTYPES:
        qt = fq.quantize(x, qtype, scale_mode="block", block_size=32)
        zero_scale = 0.0 if qtype == "int8" else 1.0
        assert qt.scales.tolist()[:5] == [zero_scale] * 5
        assert (qt.data[: 2 * 64 + 32] == 0).all()
        assert (fq.dequantize(qt)[:2] == 0).all()


def test_bad_scales_are_errors():
    x = data.make("normal", 4, 128, seed=0)
    for qtype in QTYPES:
        qt = fq.quantize(x, qtype, scale_mode="block", block_size=32)
        fields = dict(qtype=qtype, shape=qt.shape, data=qt.data, scale_mode="block")
        with pytest.raises(fq.QuantizeError, match="scales"):
            fq.dequantize(fq.QTensor(**fields, block_size=32, stats=qt.stats[:-1]))
        with pytest.raises(fq.QuantizeError):
            fq.dequantize(fq.QTensor(**fields, block_size=48, stats=qt.stats))
        row = fq.quantize(x, qtype)
        assert row.scale_mode == "row" and row.block_size == 128 and row.scales.size == 4
        with pytest.raises(fq.QuantizeError):
            fq.dequantize(fq.QTensor(qtype, row.shape, row.data, 64, row.stats, "row"))
        with pytest.raises(fq.QuantizeError, match="scale mode"):
            fq.dequantize(fq.QTensor(qtype, row.shape, row.data, 128, row.stats, None))
        with pytest.raises(fq.QuantizeError, match="multiple"):
            fq.quantize(x, qtype, scale_mode="block", block_size=256)
    with pytest.raises(fq.QuantizeError, match="scale_mode"):
        fq.quantize(x, "nf4", scale_mode="row")


# ---- properties -------------------------------------------------------------------------------

# |x| <= 1e38 keeps q * scale finite: for amax near float32's maximum, 127 * (amax / 127) can
# round up to infinity (in torch as here), which no error bound survives.
BIG = float(np.float32(1e38))
finite = st.floats(-BIG, BIG, width=32)
mats = hnp.arrays(np.float32, st.sampled_from([(1, 64), (4, 64), (3, 128)]), elements=finite)
prop = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expand(qt: fq.QTensor) -> np.ndarray:
    """The scale of every weight."""
    return np.repeat(qt.scales, qt.block_size).reshape(qt.shape)


@prop
@given(x=mats, mode=st.sampled_from(MODES))
def test_int8_round_trip_bound(x, mode):
    """|x - q*s| <= s/2 + rounding: x/s is within an ulp of the real quotient (|x/s| <= 127 and
    then some), rounding to an integer moves it by at most 1/2, and q*s rounds once more. When
    s is a subnormal (precision lost) or 0 the bound does not hold and is not tested."""
    qt = fq.quantize(x, "int8", scale_mode=mode, block_size=32)
    y = fq.dequantize(qt).astype(np.float64)
    s = expand(qt).astype(np.float64)
    err = np.abs(x.astype(np.float64) - y)
    normal = s >= np.finfo(np.float32).tiny
    assert (err[normal] <= s[normal] * (0.5 + 2.0**-16)).all()


@prop
@given(x=mats, mode=st.sampled_from(MODES), qtype=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]))
def test_fp8_round_trip_bound(x, mode, qtype):
    """Relative error at most half an fp8 ulp, 2^-4 (e4m3, 3 mantissa bits) or 2^-3 (e5m2), plus
    the float32 roundings of x / s and q * s; below the smallest fp8 normal the absolute error is
    at most half the smallest fp8 subnormal times s (2^-10 s for e4m3, 2^-17 s for e5m2)."""
    qt = fq.quantize(x, qtype, scale_mode=mode, block_size=32)
    s = expand(qt).astype(np.float64)
    assume_normal = s >= np.finfo(np.float32).tiny * 2**24  # scales with full float32 precision
    y = fq.dequantize(qt).astype(np.float64)
    rel, floor = (2.0**-4, 2.0**-10) if qtype == "fp8_e4m3" else (2.0**-3, 2.0**-17)
    err = np.abs(x.astype(np.float64) - y)
    bound = np.abs(x) * (rel + 2.0**-22) + s * floor * (1 + 2.0**-22)
    assert (err[assume_normal] <= bound[assume_normal]).all()


@prop
@given(x=mats, mode=st.sampled_from(MODES), qtype=st.sampled_from(QTYPES))
def test_sign_symmetry(x, mode, qtype):
    """Negating the input keeps the scales and negates the stored values: int8 q -> -q (round
    half to even and the clamp are symmetric), fp8 flips the sign bit (zero included: -0.0
    is stored as 0x80, as torch's cast does)."""
    a = fq.quantize(x, qtype, scale_mode=mode, block_size=32)
    b = fq.quantize(-x, qtype, scale_mode=mode, block_size=32)
    assert np.array_equal(bits(a.scales), bits(b.scales))
    if qtype == "int8":
        assert np.array_equal(-a.data.view(np.int8), b.data.view(np.int8))
    else:
        assert np.array_equal(a.data ^ 0x80, b.data)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), mode=st.sampled_from(MODES), qtype=st.sampled_from(QTYPES))
def test_thread_count_does_not_change_results(seed, mode, qtype):
    x = data.make("heavy_tailed", 96, 512, seed=seed)
    try:
        fq.set_num_threads(1)
        one = fq.quantize(x, qtype, scale_mode=mode)
        y1 = fq.dequantize(one)
        fq.set_num_threads(2)
        two = fq.quantize(x, qtype, scale_mode=mode)
        y2 = fq.dequantize(two)
    finally:
        fq.set_num_threads(0)
    assert np.array_equal(one.data, two.data)
    assert np.array_equal(bits(one.scales), bits(two.scales))
    assert same_floats(y1, y2)
