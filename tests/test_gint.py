"""The grouped integer family (`int{bits}_g{group|ch}[_sym]`): the reference quantizer against
GPTQModel's own `Quantizer` (live), the layout, the CPU matmul through QuantLinear, GPTQ into it,
and the GPTQ / AWQ checkpoint packing (exact both ways, property-based).

Provenance: the codes, zeros and scales are compared with GPTQModel's `find_params` + `quantize`
on the same float32 weights (the rule GPTQ, AutoGPTQ and GPTQModel share); the packed checkpoint
tensors are compared with GPTQModel's own dequantization in test_gptq_checkpoints.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.models import packed_int
from ferroquant.qtypes import gint_name, gint_params

from peers import require

torch = pytest.importorskip("torch")

GINTS = tuple(q.name for q in fq.qtypes() if gint_params(q.name) is not None)


def _codes(qt: fq.QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, codes, scales, zeros = packed_int._parts(qt)
    return codes, scales, zeros


def test_the_family_is_named_consistently():
    assert len(GINTS) == 28
    for name in GINTS:
        gi = gint_params(name)
        assert gint_name(gi.bits, gi.group, gi.sym) == name
        info = fq.qtype_info(name)
        assert info.ggml_id is None
    assert gint_params("int8") is None and gint_params("q4_0") is None
    with pytest.raises(fq.QuantizeError, match="int8_g64"):
        gint_name(8, 64, False)  # 8 bits are symmetric only


@pytest.mark.parametrize("name", GINTS)
def test_reference_quantizer_equals_gptqmodel_quantizer(name):
    """Codes, zeros and scales against GPTQModel's Quantizer, group by group (live)."""
    require("gptqmodel")
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    gi = gint_params(name)
    rng = np.random.default_rng(gi.bits * 100 + gi.group + gi.sym)
    cols = 256
    w = (rng.standard_normal((6, cols)) * 0.05).astype(np.float32)
    w[1] = np.abs(w[1])  # a row without negative weights (sym keeps xmin = 0 there)
    w[2, :64] = 0.0  # an all-zero group
    w[3] *= 1e-3
    qt = fq.quantize(w, name)
    codes, scales, zeros = _codes(qt)
    group = gi.group or cols
    qc = QuantizeConfig(bits=gi.bits, group_size=gi.group or -1, sym=gi.sym)
    for g0 in range(0, cols, group):
        q = Quantizer(qc)
        q.configure(perchannel=True)
        x = torch.from_numpy(w[:, g0 : g0 + group])
        q.find_params(x, weight=True)
        scale, zero = q.scale.reshape(-1), q.zero.reshape(-1)
        peer_codes = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, q.maxq)
        k = g0 // group
        assert np.array_equal(codes[:, g0 : g0 + group], peer_codes.numpy().astype(np.int64))
        assert np.array_equal(zeros[:, k], zero.numpy().astype(np.int64))
        assert np.array_equal(scales[:, k], scale.to(torch.float16).float().numpy())
    # dequantized = fp16 scale * (q - z), exactly
    want = (codes - np.repeat(zeros, group, 1)) * np.repeat(scales, group, 1)
    assert np.array_equal(fq.dequantize(qt), want.astype(np.float32))


def test_layout_is_a_little_endian_bit_stream_per_row():
    w = np.array([[-1.0] + [0.0] * 62 + [2.0]], np.float32)  # range [-1, 2]: scale 0.2, zero 5
    qt = fq.quantize(w, "int4_g64")
    assert qt.data.shape == (32,) and qt.block_size == 64
    assert qt.data[0] == (5 << 4) | 0  # code 0 (the -1) low nibble, code 5 (a 0.0) high
    assert qt.data[31] == (15 << 4) | 5
    np.testing.assert_array_equal(qt.stats, np.array([np.float16(0.2), 5.0], np.float32))
    three = fq.quantize(np.tile(w, (1, 1)), "int3_g64")
    assert three.data.size == 64 * 3 // 8


@pytest.mark.parametrize("name", ["int4_g64", "int3_g128", "int2_gch_sym", "int8_g32_sym"])
def test_a_group_that_does_not_divide_the_row_is_a_clear_error(name):
    cols = 80 if gint_params(name).group else 100  # 100: not whole bytes of per-channel codes
    with pytest.raises(fq.QuantizeError, match=rf"{name}.*{cols}|{cols}.*{name}"):
        fq.quantize(np.ones((2, cols), np.float32), name)
    from ferroquant.nn import QuantLinear

    with pytest.raises(fq.QuantizeError, match=name):
        QuantLinear.from_linear(torch.nn.Linear(cols, 4), name)


@pytest.mark.parametrize(
    "name", ["int4_g64", "int4_g128_sym", "int3_g32", "int2_gch", "int8_gch_sym"]
)
def test_quantlinear_runs_the_native_kernel_close_to_the_dequantized_product(name):
    from ferroquant.nn import QuantLinear, ops

    assert ops.native_kernel_available(name)
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 40)
    q = QuantLinear.from_linear(lin, name)
    x = torch.randn(5, 384)
    with torch.no_grad():
        y = q(x)
        ref = x @ q.dequantized_weight().T + lin.bias
    # q16 activations: at most 2^-16 of each 64-block's amax per element
    bound = 1e-4 * (x.abs() @ q.dequantized_weight().abs().T) + 1e-6
    assert torch.all((y - ref).abs() <= bound)
    # every M gives the same bits per row (the kernels' order does not depend on M)
    for m in (1, 2, 3):
        assert torch.equal(q(x[:m]), y[:m])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(
        ["int4_g64", "int4_g32", "int4_g128_sym", "int4_gch", "int8_g64_sym", "int3_g64"]
    ),  # fmt: skip
    units=st.integers(1, 9),
    n=st.integers(1, 5),
    m=st.integers(1, 11),
    seed=st.integers(0, 2**32 - 1),
    wide=st.booleans(),
)
def test_native_grouped_matmul_within_its_derived_bound(name, units, n, m, seed, wide):
    """`qmatmul` below the bf16 threshold (the fused 4 / 8-bit kernel where the CPU has AVX-512
    VNNI, else the int8 decode) against the float64 product of the dequantized weights: half a
    q16 step per activation (2^-16 of its 64-block's amax) times |w|, plus c·2^-24 of the
    magnitudes the float sums add (codes times scales, the zero term s·z per group), c the
    longest rounding chain (reference/gint.rs, reference/q16.rs)."""
    from ferroquant import _native

    gi = gint_params(name)
    # below the bf16 path (12 rows; 8 where AMX bf16 runs)
    t = _native.qmatmul_bf16_min_m()
    m = min(m, t - 1) if t else m
    k = 128 * units if gi.group in (0, 128) else 64 * units
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if wide:  # blocks of very different magnitudes
        x *= np.float32(10.0) ** rng.integers(-3, 4, size=(m, k // 8)).repeat(8, axis=1)
    qt = fq.quantize(w, name)
    codes, scales, zeros = _codes(qt)
    gl = qt.block_size
    deq = fq.dequantize(qt).astype(np.float64)
    y = _native.qmatmul(x, qt.data, name, n, k, gl, qt.stats).reshape(m, n)
    exact = x.astype(np.float64) @ deq.T
    amax = np.abs(x.reshape(m, -1, 64)).max(axis=2).astype(np.float64)  # [m, blocks]
    step = np.repeat(amax / 32767.0, 64, axis=1)[:, :k]  # q16 step per element
    act = (step * 0.5 * (1 + 1e-6)) @ np.abs(deq).T
    s = np.repeat(scales.astype(np.float64), gl, axis=1)
    z = np.repeat(zeros.astype(np.float64), gl, axis=1)
    mags = np.abs(x.astype(np.float64)) + step
    terms = mags @ (s * (codes + 2 * z)).T
    chain = k // 32 + k // gl // 16 + gl // 64 + 12
    bound = act + chain * 2.0**-24 * terms * 1.01 + 1e-30
    assert np.all(np.abs(y - exact) <= bound), float(np.max(np.abs(y - exact) / bound))


def test_quantize_model_with_gptq_into_int4_g64():
    from ferroquant.methods import GPTQConfig, gptq_quantize, layer_error
    from ferroquant.nn import QuantLinear

    g = torch.Generator().manual_seed(3)
    cols = 256
    mix = torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols)
    x = torch.randn(512, cols, generator=g) @ mix
    h = 2.0 * x.T @ x / 512
    w = torch.randn(16, cols, generator=g) * 0.05
    qt, values = gptq_quantize(w, h, "int4_g64", GPTQConfig())
    assert qt.qtype == "int4_g64"
    assert np.array_equal(fq.dequantize(qt), values.numpy())
    rtn = torch.from_numpy(fq.dequantize(fq.quantize(w.numpy(), "int4_g64")))
    assert layer_error(w, values, h) < 0.8 * layer_error(w, rtn, h)
    mod = QuantLinear.from_qtensor(qt)
    assert mod.qtype == "int4_g64" and mod(x[:2]).shape == (2, 16)


@st.composite
def _gint_tensor(draw):
    name = draw(st.sampled_from(GINTS))
    gi = gint_params(name)
    rows = draw(
        st.sampled_from([32, 64, 96])
    )  # GPTQ packs the zeros of 32 rows in 3 words (3 bits)
    cols = (
        draw(st.sampled_from([128, 256, 384])) if gi.group != 32 else 64 * draw(st.integers(1, 4))
    )
    seed = draw(st.integers(0, 2**32 - 1))
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return fq.quantize(w, name)


@settings(max_examples=60, deadline=None)
@given(_gint_tensor())
def test_gptq_packing_round_trips_exactly(qt):
    t = packed_int.to_gptq(qt)
    gi = gint_params(qt.qtype)
    n, k = qt.shape
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (k * gi.bits // 32, n)
    assert t["scales"].dtype == np.float16 and t["g_idx"].shape == (k,)
    back = packed_int.from_gptq(t, gi.bits, gi.group or -1, gi.sym)
    assert back.qtype == qt.qtype
    assert np.array_equal(back.data, qt.data) and np.array_equal(back.stats, qt.stats)


@settings(max_examples=40, deadline=None)
@given(_gint_tensor())
def test_awq_packing_round_trips_exactly(qt):
    gi = gint_params(qt.qtype)
    if gi.bits != 4:
        with pytest.raises(fq.QuantizeError, match="4-bit"):
            packed_int.to_awq(qt)
        return
    t = packed_int.to_awq(qt)
    back = packed_int.from_awq(t, 4, gi.group or -1)
    assert np.array_equal(fq.dequantize(back), fq.dequantize(qt))


def test_gptq_packing_matches_the_format_s_definition():
    """qweight word i of column n holds codes 8i..8i+7 of that column, low nibble first; qzeros
    store zero - 1; AWQ's word c holds columns 8c + [0, 2, 4, 6, 1, 3, 5, 7]."""
    rng = np.random.default_rng(5)
    qt = fq.quantize(rng.standard_normal((16, 64)).astype(np.float32), "int4_g64")
    codes, _, zeros = _codes(qt)
    t = packed_int.to_gptq(qt)
    qw = t["qweight"].view(np.uint32)
    for i in range(8):
        for n in (0, 5):
            assert qw[i, n] == sum(int(codes[n, 8 * i + j]) << (4 * j) for j in range(8))
    qz = t["qzeros"].view(np.uint32)
    assert qz[0, 1] == sum(((int(zeros[8 + j, 0]) - 1) & 15) << (4 * j) for j in range(8))
    a = packed_int.to_awq(qt)["qweight"].view(np.uint32)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert a[3, 1] == sum(int(codes[8 + order[i], 3]) << (4 * i) for i in range(8))


def test_act_order_g_idx_is_refused_with_a_clear_error():
    qt = fq.quantize(np.ones((8, 128), np.float32), "int4_g64_sym")
    t = packed_int.to_gptq(qt)
    t["g_idx"] = t["g_idx"][::-1].copy()
    with pytest.raises(fq.QuantizeError, match="g_idx.*act-order"):
        packed_int.from_gptq(t, 4, 64, True, "layer.q_proj")
