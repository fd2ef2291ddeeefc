"""The public API: inputs of every accepted kind, QTensor, and bad input raising QuantizeError
(a ValueError) with a message naming the problem — never a crash."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq

ALL = [q.name for q in fq.qtypes()]
GGML_FIXED = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"}


def test_qtype_table_matches_design():
    table = {q.name: q for q in fq.qtypes()}
    expected = {  # ggml-common.h / ggml.h: bytes per block, weights per block, ggml type id
        "q4_0": (18, 32, 2),
        "q4_1": (20, 32, 3),
        "q5_0": (22, 32, 6),
        "q5_1": (24, 32, 7),
        "q8_0": (34, 32, 8),
        "q2_k": (84, 256, 10),
        "q3_k": (110, 256, 11),
        "q4_k": (144, 256, 12),
        "q5_k": (176, 256, 13),
        "q6_k": (210, 256, 14),
        "iq4_nl": (18, 32, 20),
        "iq4_xs": (136, 256, 23),
        "f32": (4, 1, 0),
        "f16": (2, 1, 1),
        "bf16": (2, 1, 30),
    }
    for name, (type_size, block, ggml_id) in expected.items():
        q = table[name]
        assert (q.type_size, q.block_size, q.ggml_id) == (type_size, block, ggml_id)
        assert q.bits_per_weight == pytest.approx(8 * type_size / block)
    assert set(table) >= {"nf4", "fp4", "int8", "fp8_e4m3", "fp8_e5m2"}
    assert issubclass(fq.QuantizeError, ValueError) and issubclass(fq.FormatError, ValueError)


def test_ggml_types_match_the_table_in_gguf_py():
    gguf = pytest.importorskip("gguf") if not _ci() else __import__("gguf")
    for q in fq.qtypes():
        if q.ggml_id is None:
            continue
        t = gguf.GGMLQuantizationType(q.ggml_id)
        block, type_size = gguf.GGML_QUANT_SIZES[t]
        assert (block, type_size) == (q.block_size, q.type_size), q.name
        assert t.name.lower() == q.name


def _ci() -> bool:
    from peers import REQUIRE_PEERS

    return REQUIRE_PEERS


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_1", "f16", "bf16"])
def test_leading_dims_and_16_bit_inputs(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    qt = fq.quantize(x, qtype)
    assert qt.shape == (2, 3, 64) and qt.qtype == qtype
    assert fq.dequantize(qt).shape == (2, 3, 64)
    assert qt.data.dtype == np.uint8 and qt.data.ndim == 1
    # a float16 input quantizes exactly like its float32 upcast
    x16 = x.astype(np.float16)
    assert np.array_equal(
        fq.quantize(x16, qtype).data, fq.quantize(x16.astype(np.float32), qtype).data
    )


def test_bfloat16_numpy_and_torch_inputs_match_their_float32_upcast():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    xb = x.astype(ml_dtypes.bfloat16)
    up = xb.astype(np.float32)
    assert np.array_equal(fq.quantize(xb, "q4_1").data, fq.quantize(up, "q4_1").data)
    tb = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(fq.quantize(tb, "q4_1").data, fq.quantize(tb.float(), "q4_1").data)
    assert np.array_equal(fq.quantize(tb.float(), "q4_1").data, fq.quantize(up, "q4_1").data)
    # bf16 storage round-trips the bf16 values exactly
    assert np.array_equal(fq.dequantize(fq.quantize(up, "bf16")), up)


def test_formats_without_float16_fields_take_any_finite_value():
    x = np.full((2, 64), -1e30, np.float32)
    for qtype in ("f32", "bf16", "nf4", "int8", "fp8_e4m3"):
        y = fq.dequantize(fq.quantize(x, qtype))
        assert np.isfinite(y).all(), qtype


def test_float_formats_are_exact_casts():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 50)) * 100).astype(np.float32)
    assert np.array_equal(fq.dequantize(fq.quantize(x, "f32")), x)
    assert np.array_equal(
        fq.dequantize(fq.quantize(x, "f16")), x.astype(np.float16).astype(np.float32)
    )
    assert np.array_equal(
        fq.quantize(x, "f16").data, x.astype(np.float16).view(np.uint8).reshape(-1)
    )


def test_qtensor_reports_size():
    x = np.ones((8, 256), np.float32)
    qt = fq.quantize(x, "q8_0")
    assert qt.nbytes == 8 * 256 // 32 * 34
    assert qt.bits_per_weight == pytest.approx(8.5)
    assert "q8_0" in repr(qt)


BAD_INPUTS = [
    (lambda: fq.quantize(np.zeros((2, 33), np.float32), "q8_0"), "multiple of"),
    (lambda: fq.quantize(np.zeros((2, 32), np.float64), "q8_0"), "dtype float64"),
    (lambda: fq.quantize(np.zeros((2, 32), np.int32), "q8_0"), "dtype int32"),
    (lambda: fq.quantize(np.zeros((0, 32), np.float32), "q8_0"), "empty"),
    (lambda: fq.quantize(np.zeros((4, 0), np.float32), "q8_0"), "empty"),
    (lambda: fq.quantize(np.zeros((4, 64), np.float32)[:, ::2], "q8_0"), "contiguous"),
    (lambda: fq.quantize(np.zeros((2, 32), np.float32), "q9_9"), "unknown qtype"),
    (lambda: fq.quantize(np.float32(1.0), "q8_0"), "scalar"),
    (lambda: fq.quantize([1.0, 2.0], "q8_0"), "numpy array"),
    (lambda: fq.quantize(np.full((2, 32), np.nan, np.float32), "q8_0"), "non-finite"),
    (
        lambda: fq.quantize(_with(np.zeros((3, 64), np.float32), 2, 5, np.inf), "q4_0"),
        "row 2, column 5",
    ),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "q4_0", np.ones(32)), "imatrix has 32"),
    (
        lambda: fq.quantize(_with(np.zeros((2, 64), np.float32), 1, 9, -1e5), "q8_0"),
        "row 1, column 9 is beyond q8_0's range",
    ),
    (lambda: fq.quantize(np.full((1, 32), 7e4, np.float32), "f16"), "beyond f16's range"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "q4_0", -np.ones(64)), "imatrix value"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "q8_0", block_size=64), "block_size"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "nf4", block_size=48), "block size 48"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "nf4", block_size=8192), "block size"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "q4_0", double_quant=True), "double_quant"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "int8", scale_mode="col"), "scale mode"),
    (lambda: fq.quantize(np.zeros((2, 64), np.float32), "nf4", imatrix=np.ones(64)), "imatrix"),
]


def _with(a, r, c, v):
    a[r, c] = v
    return a


@pytest.mark.parametrize("call,needle", BAD_INPUTS)
def test_bad_input_raises_quantize_error_naming_the_problem(call, needle):
    with pytest.raises(fq.QuantizeError) as e:
        call()
    assert needle in str(e.value)


def test_dequantize_rejects_mismatched_buffers():
    qt = fq.quantize(np.ones((4, 64), np.float32), "q4_0")
    bad = fq.QTensor("q4_0", (4, 64), qt.data[:-1], qt.block_size)
    with pytest.raises(fq.QuantizeError, match="data has 143 elements"):
        fq.dequantize(bad)
    with pytest.raises(fq.QuantizeError, match="multiple of"):
        fq.dequantize(fq.QTensor("q4_0", (4, 60), qt.data, qt.block_size))
    with pytest.raises(fq.QuantizeError, match="QTensor"):
        fq.dequantize(qt.data)


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((97, 512)).astype(np.float32)
    before = fq.num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            fq.set_num_threads(n)
            assert fq.num_threads() == n
            results[n] = {q: fq.quantize(x, q).data for q in ("q4_0", "q5_1", "q8_0", "f16")}
        for q in results[1]:
            assert np.array_equal(results[1][q], results[2][q])
            assert np.array_equal(results[1][q], results[3][q])
    finally:
        fq.set_num_threads(before)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(0, 5),
    cols=st.integers(0, 300),
    qtype=st.sampled_from(ALL),
    dtype=st.sampled_from(["float32", "float16", "float64", "int8"]),
    block=st.one_of(st.none(), st.integers(-1, 5000)),
    use_imatrix=st.booleans(),
    fill=st.sampled_from([0.0, 1.0, np.nan, np.inf, -1e30, 1e-40]),
)
def test_arbitrary_requests_never_crash(rows, cols, qtype, dtype, block, use_imatrix, fill):
    """Every request either succeeds or raises QuantizeError; nothing else escapes."""
    with np.errstate(over="ignore"):  # -1e30 overflows float16 to -inf on purpose
        x = (
            np.full((rows, cols), fill).astype(dtype, copy=False)
            if dtype != "int8"
            else np.zeros((rows, cols), np.int8)
        )
    imatrix = np.ones(cols, np.float32) if use_imatrix else None
    try:
        qt = fq.quantize(x, qtype, imatrix, block_size=block)
    except fq.QuantizeError:
        return
    except OverflowError:
        assert block is not None and block < 0  # negative block sizes fail in argument conversion
        return
    y = fq.dequantize(qt)
    assert y.shape == x.shape and np.isfinite(y).all()


def test_a_process_survives_garbage_dequantize_requests():
    """Random bytes and shapes through the native dequantize: errors, never an abort."""
    code = r"""
import numpy as np, ferroquant as fq
from ferroquant import _native
rng = np.random.default_rng(0)
names = [q.name for q in fq.qtypes()]
n_ok = n_err = 0
for i in range(3000):
    q = names[i % len(names)]
    data = rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8)
    rows, cols = int(rng.integers(0, 4)), int(rng.integers(0, 600))
    block = int(rng.choice([0, 1, 32, 64, 256, 4096, 7]))
    stats = rng.standard_normal(int(rng.integers(0, 40))).astype(np.float32)
    mode = [None, "row", "tensor", "block"][i % 4]
    try:
        _native.dequantize(data, q, rows, cols, block, stats, mode, None)
        n_ok += 1
    except fq.QuantizeError:
        n_err += 1
print(n_ok, n_err)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, err = map(int, r.stdout.split())
    assert err > 0
