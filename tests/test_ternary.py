"""tq1_0 and tq2_0 (ggml's ternary formats, BitNet b1.58): quantization byte for byte against
libggml's `ggml_quantize_chunk` and gguf-py's `quantize`, dequantization bit for bit against
gguf-py and libggml's `dequantize_row_tq*_0`; the CPU matmul bit for bit against libggml's own
`ggml_vec_dot_tq*_0_q8_K_generic` (each super-block's product from libggml, summed in the
reference's documented lane order); properties (values in {-d, 0, +d} per block with d the
block's max |x| as f16, exact round trip of ternary data, sign symmetry)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ferroquant as fq
from ferroquant import _native

import peers
from data import DISTRIBUTIONS, make
from peers import check_bytes, same_bits

QTYPES = ("tq1_0", "tq2_0")
BLOCK_BYTES = {"tq1_0": 54, "tq2_0": 66}
SHAPES = ((1, 256), (5, 512), (3, 1536))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# finite values within the f16 range of the block scale (larger ones raise QuantizeError)
SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-20, 65504.0, -65504.0])
ARBITRARY = st.floats(-65504.0, 65504.0, width=32) | SPECIAL


def _ggml_dequantize(qtype: str, data: np.ndarray, n: int) -> np.ndarray:
    fn = getattr(peers.libggml(), f"dequantize_row_{qtype}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    y = np.zeros(n, np.float32)
    fn(data.ctypes.data, y.ctypes.data, n)
    return y


def _gguf_quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    return peers.gguf_quants().quantize(x, peers.gguf_qtype(qtype)).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize against the peers


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_matches_libggml_and_gguf_py(qtype, dist):
    for rows, cols in SHAPES:
        x = make(dist, rows, cols, seed=rows)
        ours = fq.quantize(x, qtype).data
        check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, f"libggml {dist} {rows}x{cols}")
        check_bytes(ours, _gguf_quantize(x, qtype), qtype, f"gguf-py {dist} {rows}x{cols}")


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(256)), elements=ARBITRARY),
)
def test_quantize_matches_libggml_on_arbitrary_arrays(qtype, x):
    """Repeated values, exact zeros, ties at ±0.5·max (lroundf rounds them away from zero)."""
    ours = fq.quantize(x, qtype).data
    check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, "libggml")
    check_bytes(ours, _gguf_quantize(x, qtype), qtype, "gguf-py")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("amax", [1.42e-43, 1e-40, 3e-39, 1.2e-38])
def test_quantize_matches_libggml_on_subnormal_blocks(qtype, amax):
    """A block max below ~2.9e-39 makes ggml's 1/d overflow to inf (x·id inf or NaN, lroundf's
    x86 result LONG_MIN): hypothesis found our digits differed there; pinned on both sides of it."""
    x = np.zeros((2, 256), np.float32)
    x[0] = np.float32(amax)
    x[1, ::3] = np.float32(amax)
    x[1, 1::3] = -np.float32(amax) / 2
    ours = fq.quantize(x, qtype).data
    check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, "libggml")
    check_bytes(ours, _gguf_quantize(x, qtype), qtype, "gguf-py")


@SETTINGS
@given(qtype=st.sampled_from(QTYPES), dist=st.sampled_from(DISTRIBUTIONS), seed=st.integers(0, 999))
def test_quantize_matches_libggml_on_fresh_data(qtype, dist, seed):
    x = make(dist, 2, 768, seed)
    check_bytes(fq.quantize(x, qtype).data, peers.ggml_quantize(x, qtype), qtype, dist)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_gguf_py_and_libggml(qtype):
    t = peers.gguf_qtype(qtype)
    for dist in DISTRIBUTIONS:
        for rows, cols in SHAPES:
            qt = fq.quantize(make(dist, rows, cols, seed=7), qtype)
            ours = fq.dequantize(qt)
            ref = peers.gguf_quants().dequantize(qt.data.reshape(rows, -1), t)
            assert same_bits(ours, ref), (qtype, dist, rows, cols)
            assert same_bits(ours, _ggml_dequantize(qtype, qt.data, rows * cols)), (qtype, dist)


@SETTINGS
@given(qtype=st.sampled_from(QTYPES), nblocks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_dequantize_of_arbitrary_bytes_matches_gguf_py_and_libggml(qtype, nblocks, seed):
    """Every byte pattern (tq1_0 bytes above 242 and tq2_0's unused code 3 included) and f16
    scales that are subnormal, inf or NaN."""
    data = np.random.default_rng(seed).integers(0, 256, nblocks * BLOCK_BYTES[qtype], np.uint8)
    cols = nblocks * 256
    ours = fq.dequantize(fq.QTensor(qtype, (cols,), data, 256))
    with np.errstate(all="ignore"):
        ref = peers.gguf_quants().dequantize(data, peers.gguf_qtype(qtype))
    lib = _ggml_dequantize(qtype, data, cols)
    assert np.array_equal(ours, ref, equal_nan=True) and np.array_equal(ours, lib, equal_nan=True)
    finite = np.isfinite(ref)
    assert same_bits(ours[finite], ref[finite]) and same_bits(ours[finite], lib[finite])


# ---------------------------------------------------------------------------------------------
# Properties


VALUES = st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, 1e-3, -7.5])


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    x=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 3), st.sampled_from([256, 512])), elements=VALUES
    ),
)
def test_values_are_minus_zero_plus_the_block_max(qtype, x):
    """Every dequantized value is -d, 0 or +d with d = f16(max |x| of its block of 256), and each
    is the nearest of the three to x·(d / max|x|) (ties away from zero, as lroundf)."""
    y = fq.dequantize(fq.quantize(x, qtype)).astype(np.float64)
    rows, cols = x.shape
    xb = x.astype(np.float64).reshape(rows, cols // 256, 256)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = amax.astype(np.float16).astype(np.float64)
    yb = y.reshape(xb.shape)
    assert np.isin(yb / np.where(d == 0, 1, d), (-1.0, 0.0, 1.0)).all()
    # the rounding: r = x / amax, |r| <= 1; away from the ties at ±1/2 (f32 rounding of 1/amax)
    r = np.divide(xb, amax, out=np.zeros_like(xb), where=amax > 0)
    clear = np.abs(np.abs(r) - 0.5) > 1e-6
    want = np.sign(r) * (np.abs(r) > 0.5) * d
    assert np.array_equal(yb[clear], want[clear])


@SETTINGS
@given(
    qtype=st.sampled_from(QTYPES),
    trits=hnp.arrays(
        np.int8, st.tuples(st.integers(1, 3), st.just(512)), elements=st.integers(-1, 1)
    ),
    exps=st.lists(st.integers(-14, 15), min_size=2, max_size=2),
)
def test_ternary_data_round_trips_exactly(qtype, trits, exps):
    """{-s, 0, +s} per block with s an f16 power of two (and one ±s in each block, so max|x| =
    s): dequantize(quantize(x)) == x bit for bit, and the bytes are libggml's."""
    trits = trits.copy()
    trits[:, 0] = 1
    trits[:, 256] = -1
    s = np.repeat(np.float32(2.0) ** np.array(exps, np.float32), 256)
    x = (trits * s).astype(np.float32)
    qt = fq.quantize(x, qtype)
    assert same_bits(fq.dequantize(qt), x)
    check_bytes(qt.data, peers.ggml_quantize(x, qtype), qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_sign_symmetry_and_zero_blocks(qtype):
    x = make("normal", 4, 512, seed=3)
    x[1, :256] = 0.0
    y = fq.dequantize(fq.quantize(x, qtype))
    assert np.array_equal(fq.dequantize(fq.quantize(-x, qtype)), -y)
    assert not y[1, :256].any()


@pytest.mark.parametrize("qtype", QTYPES)
def test_rows_not_a_multiple_of_256_are_refused(qtype):
    with pytest.raises(fq.QuantizeError, match="256"):
        fq.quantize(np.ones((2, 576), np.float32), qtype)


# ---------------------------------------------------------------------------------------------
# Matmul against libggml's vec_dot, bit for bit


def _vec_dot_blocks(qtype: str, wrow: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """libggml's `ggml_vec_dot_<qtype>_q8_K_generic` on each super-block alone (n = 256): the
    per-block float products (for one block its result is `(float) sum * (d_w * d_x)`)."""
    from test_matmul import _libggml_cpu

    fn = getattr(_libggml_cpu(), f"ggml_vec_dot_{qtype}_q8_K_generic")
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]  # fmt: skip
    nb = xq.size // 292
    s = np.zeros(1, np.float32)
    out = np.zeros(nb, np.float32)
    wb = BLOCK_BYTES[qtype]
    for b in range(nb):
        fn(256, s.ctypes.data, 0, wrow[b * wb :].ctypes.data, 0, xq[b * 292 :].ctypes.data, 0, 1)
        out[b] = s[0]
    return out


def _lane_sum(p: np.ndarray) -> np.float32:
    """The reference's float order (rust/core/src/matmul/reference.rs): block b into lane b % 8,
    then ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), all in float32."""
    acc = np.zeros(8, np.float32)
    for b, v in enumerate(p.astype(np.float32)):
        acc[b % 8] = np.float32(acc[b % 8] + v)
    s = [np.float32(acc[i] + acc[i + 4]) for i in range(4)]
    return np.float32(np.float32(s[0] + s[2]) + np.float32(s[1] + s[3]))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dist", ("normal", "outliers", "zero_and_constant_blocks", "huge"))
@pytest.mark.parametrize("k", (256, 2560))
def test_matmul_bit_exact_with_libggml_vec_dot(qtype, dist, k):
    """Weights quantized by libggml, activations quantized by libggml's `quantize_row_q8_K_ref`;
    our output equals libggml's per-super-block products summed in the reference's lane order,
    bit for bit (K = 256: libggml's vec_dot result itself). Covers whatever kernel this CPU runs
    (AVX2 here, NEON on aarch64) at M = 1 and M = 5."""
    from test_matmul import _libggml_cpu

    n, m = 7, 5
    w = make(dist, n, k, seed=31)
    x = make(dist, m, k, seed=32)
    data = peers.ggml_quantize(w, qtype)
    y = _native.qmatmul(x, data, qtype, n, k, 256, None, None)
    y1 = _native.qmatmul(x[:1], data, qtype, n, k, 256, None, None)
    _libggml_cpu()
    quant = peers.libggml().quantize_row_q8_K_ref
    rb = data.size // n
    for mi in range(m):
        xq = np.zeros(k // 256 * 292, np.uint8)
        quant(np.ascontiguousarray(x[mi]).ctypes.data, xq.ctypes.data, k)
        want = np.array(
            [_lane_sum(_vec_dot_blocks(qtype, data[r * rb : (r + 1) * rb], xq)) for r in range(n)]
        )
        assert same_bits(y[mi], want), (qtype, dist, mi, y[mi], want)
    assert same_bits(y1[0], y[0])


# ---------------------------------------------------------------------------------------------
# GGUF files and QuantLinear


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_round_trip_with_gguf_py_and_libggml_bytes(qtype, tmp_path):
    """Our writer's file read by gguf-py (type id 34 / 35, the bytes, its dequantization) and by
    our reader; a file gguf-py writes from libggml's bytes read by ours."""
    import ferroquant.gguf as fg

    gguf = peers.require("gguf")
    x = make("normal", 6, 512, seed=5)
    qt = fq.quantize(x, qtype)
    ours = tmp_path / "ours.gguf"
    with fg.GGUFWriter(ours, "llama") as w:
        w.add_tensor("t", qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    rt = gguf.GGUFReader(str(ours)).tensors[0]
    assert rt.tensor_type == peers.gguf_qtype(qtype)
    assert np.array_equal(np.asarray(rt.data).reshape(-1), qt.data.reshape(-1))
    theirs = tmp_path / "theirs.gguf"
    w2 = gguf.GGUFWriter(str(theirs), "llama")
    w2.add_tensor("t", peers.ggml_quantize(x, qtype).reshape(6, -1), raw_dtype=rt.tensor_type)
    w2.write_header_to_file()
    w2.write_kv_data_to_file()
    w2.write_tensors_to_file()
    w2.close()
    for path in (ours, theirs):
        with fg.open(path) as f:
            t = f.tensors["t"]
            assert t.qtype == qtype and tuple(t.shape) == (6, 512)
            assert np.array_equal(np.asarray(t.data).reshape(-1), qt.data.reshape(-1))
            assert same_bits(t.dequantize(), fq.dequantize(qt))


@pytest.mark.parametrize("qtype", QTYPES)
def test_quant_linear_runs_the_ternary_kernel(qtype):
    """QuantLinear's forward is the CPU kernel on fq.quantize's bytes (bit for bit, no bias), and
    a layer whose rows cannot hold blocks of 256 is one QuantizeError naming the shape."""
    torch = peers.require("torch")
    from ferroquant.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 40, bias=False)
    q = QuantLinear.from_linear(lin, qtype)
    x = torch.randn(3, 512)
    qt = fq.quantize(lin.weight.detach().numpy(), qtype)
    want = _native.qmatmul(x.numpy(), qt.data.reshape(-1), qtype, 40, 512, 256, None, None)
    assert same_bits(q(x).detach().numpy(), want)
    with pytest.raises(fq.QuantizeError, match="576"):
        QuantLinear.from_linear(torch.nn.Linear(576, 8), qtype)
