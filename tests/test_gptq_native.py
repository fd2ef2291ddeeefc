"""GPTQ's compiled column loop (`methods/gptq_native.py`, rust/core/src/gptq/) against the
Python loop in `methods/gptq.py`, the reference: the same stored bytes and the same values on
every format grid.py knows, in both column orders (static groups with act_order, blocks fixed
as GPTQ reaches them without), with and without the error feedback, and on dead columns.

Provenance: the expected bytes come from the reference loop run in the same test (switched by
`gptq_native.ENABLED`), never from stored output."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant import _native
from ferroquant.methods import GPTQConfig, gptq_native, gptq_quantize, layer_error
from ferroquant.methods.grid import SUPPORTED as ALL_GRIDS
from ferroquant.qtypes import gint_params

torch = pytest.importorskip("torch")

# every grid but the 28 grouped integers, of which one of each kind (one code path in both
# loops: a scale, an unrounded scale and a zero per group)
GINT_SAMPLE = ("int4_g64", "int3_g32_sym", "int2_gch", "int8_g128_sym")
SUPPORTED = tuple(q for q in ALL_GRIDS if gint_params(q) is None or q in GINT_SAMPLE)


def _problem(rows: int, cols: int, seed: int = 0, n: int = 768):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, 3] *= 20.0  # an outlier channel, as real activations have
    h = 2.0 * x.T @ x / n
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, h


def _both(monkeypatch, w, h, qtype, cfg, **kw):
    # the same inverse Hessian on both paths: the loops themselves must agree bit for bit
    monkeypatch.setattr(gptq_native, "CHOLESKY_DTYPE", torch.float64)
    monkeypatch.setattr(gptq_native, "ENABLED", False)
    ref = gptq_quantize(w, h, qtype, cfg, **kw)
    monkeypatch.setattr(gptq_native, "ENABLED", True)
    assert gptq_native.available()
    fast = gptq_quantize(w, h, qtype, cfg, **kw)
    return ref, fast


def _same(ref, fast):
    (qr, vr), (qf, vf) = ref, fast
    assert np.array_equal(np.asarray(qf.data), np.asarray(qr.data))
    assert np.array_equal(np.asarray(qf.stats), np.asarray(qr.stats))
    assert torch.equal(vf, vr)
    assert np.array_equal(fq.dequantize(qf), vf.numpy())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("qtype", SUPPORTED)
def test_native_loop_stores_the_reference_bytes(monkeypatch, qtype, act_order):
    cols = 512
    w, h = _problem(8, cols, seed=3)
    # block_size 96: lazy batches that are not whole 128-blocks (and 256-blocks span batches)
    cfg = GPTQConfig(act_order=act_order, block_size=96, scale_search=3)
    _same(*_both(monkeypatch, w, h, qtype, cfg))


@pytest.mark.parametrize("qtype", ["q4_0", "int4_g64", "nf4", "q4_k", "q8_0"])
def test_native_loop_without_feedback_and_with_dead_columns(monkeypatch, qtype):
    w, h = _problem(16, 256, seed=5)
    h[7, :] = 0.0
    h[:, 7] = 0.0
    h[100, :] = 0.0
    h[:, 100] = 0.0
    for act_order in (False, True):
        cfg = GPTQConfig(act_order=act_order)
        _same(*_both(monkeypatch, w, h, qtype, cfg))
        _same(*_both(monkeypatch, w, h, qtype, cfg, propagate=False))


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 9),
    blocks=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-4, 1e2),
    act_order=st.booleans(),
    qtype=st.sampled_from(["q4_0", "q5_1", "q8_0", "int4_g64", "int3_g32_sym", "fp4", "int8",
                           "iq4_nl", "q6_k"]),
)  # fmt: skip
def test_native_loop_equals_the_reference_on_any_shape(rows, blocks, seed, scale, act_order, qtype):
    # K-quant sizes need 256-wide rows; the others: whole blocks of 64 (int4_g64 / int3_g32)
    cols = 256 * blocks if qtype == "q6_k" else 64 * blocks
    w, h = _problem(rows, cols, seed=seed, n=2 * cols)
    w = w * scale
    cfg = GPTQConfig(act_order=act_order, block_size=64)
    mp = pytest.MonkeyPatch()
    try:
        _same(*_both(mp, w, h, qtype, cfg))
    finally:
        mp.undo()


@settings(max_examples=10, deadline=None)
@given(
    cols=st.sampled_from([256, 512]),
    samples=st.sampled_from([0.5, 2.0, 8.0]),
    seed=st.integers(0, 2**16),
    act_order=st.booleans(),
    qtype=st.sampled_from(["int4_g64", "q4_0", "nf4", "q4_k", "q3_k"]),
)
def test_float32_cholesky_keeps_the_reference_error(cols, samples, seed, act_order, qtype):
    # the documented tolerance of the fast path's one numerical difference: the calibration-
    # weighted error tr((W - Q) H (W - Q)^T) within 1 % of the float64 reference loop's (fewer
    # samples than columns: a rank-deficient Hessian, held up by the damping alone)
    w, h = _problem(16, cols, seed=seed, n=int(samples * cols))
    cfg = GPTQConfig(act_order=act_order)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(gptq_native, "ENABLED", False)
        _, ref = gptq_quantize(w, h, qtype, cfg)
        mp.setattr(gptq_native, "ENABLED", True)
        assert gptq_native.CHOLESKY_DTYPE == torch.float32
        qt, fast = gptq_quantize(w, h, qtype, cfg)
    finally:
        mp.undo()
    assert np.array_equal(fq.dequantize(qt), fast.numpy())
    e_ref, e_fast = layer_error(w, ref, h), layer_error(w, fast, h)
    assert e_fast <= 1.01 * e_ref
    assert e_fast >= 0.99 * e_ref


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), samples=st.sampled_from([0.5, 3.0]), seed=st.integers(0, 2**16))
def test_float32_inverse_factor_is_the_reference_factor(n, samples, seed):
    """The float32 path's U (one Cholesky of the flipped H, a triangular inverse by halves):
    upper triangular, U^T U = H^-1, and the float64 reference's factor to float32 accuracy."""
    from ferroquant.methods.gptq import _upper_inverse_factor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(1, int(samples * n)), n, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    h.diagonal().add_(0.01 * float(h.diagonal().mean()) + 1e-6)
    ref = _upper_inverse_factor(h)
    got = _upper_inverse_factor(h.float())
    assert ref is not None and got is not None and got.dtype == torch.float32
    assert torch.equal(got, torch.triu(got)) and bool((got.diagonal() > 0).all())
    cond = float(torch.linalg.cond(h))
    tol = 1e-5 * cond**0.5 * float(ref.abs().max())
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_parameters_are_constant_over_a_parameter_block(qtype):
    # the compiled loop reads one parameter column per `param_block` columns (a map, no copy
    # per column): every per-weight field must repeat over those runs
    from ferroquant.methods.grid import FormatGrid

    w, _ = _problem(6, 512, seed=11)
    grid = FormatGrid(qtype, (6, 512))
    pb = grid.param_block
    p = grid.params(w * 3.0)
    for name in ("scale", "grid", "inv", "low", "zero", "rscale"):
        t = getattr(p, name)
        if t is not None:
            assert torch.equal(t, t[:, ::pb].repeat_interleave(pb, dim=1)), name


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 70), seed=st.integers(0, 2**16), qtype=st.sampled_from(SUPPORTED))
def test_compiled_packing_equals_pack_levels(rows, seed, qtype):
    # _native.gptq_pack (codes in the solve's order, un-permuted while packed) against
    # grid.pack_levels on the un-permuted codes, on random block bytes and codes
    from ferroquant.methods.grid import FormatGrid

    cols = 512
    grid = FormatGrid(qtype, (rows, cols))
    rng = np.random.default_rng(seed)
    p = grid.params(torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)))
    p.data = rng.integers(0, 256, p.data.shape, dtype=np.uint8)  # every parameter bit kept
    perm = rng.permutation(cols)
    levels = rng.integers(0, grid.layout.levels, (rows, cols))
    ref = grid.qtensor([p], levels)
    got = grid.qtensor_solved([p], np.ascontiguousarray(levels[:, perm].T), perm)
    assert np.array_equal(np.asarray(got.data), np.asarray(ref.data))
    assert np.array_equal(np.asarray(got.stats), np.asarray(ref.stats))


def test_bad_pack_arguments_are_named_errors():
    data = np.zeros((2, 18), np.uint8)
    levels = np.zeros((32, 2), np.uint8)
    byte = np.repeat(np.arange(2, 18), 8)[:128].astype(np.int64)
    shift = np.tile(np.arange(4), 32).astype(np.int64)
    perm = np.arange(32, dtype=np.int64)
    _native.gptq_pack(data, levels, perm, 32, 18, 4, byte, shift, 0)
    with pytest.raises(fq.QuantizeError, match="permutation"):
        _native.gptq_pack(data, levels, np.zeros(32, np.int64), 32, 18, 4, byte, shift, 0)
    with pytest.raises(fq.QuantizeError, match="bit map"):
        _native.gptq_pack(data, levels, perm, 32, 18, 4, byte[:-1], shift, 0)
    with pytest.raises(fq.QuantizeError, match="bytes"):
        _native.gptq_pack(data[:1], levels, perm, 32, 18, 4, byte, shift, 0)
    with pytest.raises(fq.QuantizeError, match="negative"):
        _native.gptq_pack(data, levels, -perm - 1, 32, 18, 4, byte, shift, 0)


def test_bad_buffers_are_named_errors():
    rows, n = 4, 3
    w = np.zeros((n, rows), np.float32)
    err = np.zeros_like(w)
    values = np.zeros_like(w)
    levels = np.zeros((n, rows), np.uint8)
    hinv = np.eye(n, dtype=np.float32)
    scale = np.ones(n * rows, np.float32)
    with pytest.raises(fq.QuantizeError, match="rounding rule"):
        _native.gptq_columns("nope", w, hinv, err, levels, values, 0, n, scale=scale)
    with pytest.raises(fq.QuantizeError, match="outside a batch"):
        _native.gptq_columns("int8", w, hinv, err, levels, values, 0, n + 1, scale=scale)
    with pytest.raises(fq.QuantizeError, match="scale"):
        _native.gptq_columns("int8", w, hinv, err, levels, values, 0, n, scale=scale[:-1])
    with pytest.raises(fq.QuantizeError, match="inverse Hessian"):
        _native.gptq_columns("int8", w, hinv[:2, :2].copy(), err, levels, values, 0, n,
                             scale=scale)  # fmt: skip
    with pytest.raises(fq.QuantizeError, match="C-contiguous"):
        _native.gptq_columns("int8", w, hinv.T, err, levels, values, 0, n, scale=scale)
    with pytest.raises(fq.QuantizeError, match="parameter map"):
        _native.gptq_columns("int8", w, hinv, err, levels, values, 0, n, scale=scale,
                             map=np.zeros(n - 1, np.int64))  # fmt: skip
    with pytest.raises(fq.QuantizeError, match="scale"):
        _native.gptq_columns("int8", w, hinv, err, levels, values, 0, n, scale=scale,
                             map=np.full(n, n, np.int64))  # fmt: skip


def _both_ldl(w, h, qtype, cfg, **kw):
    # the float32 factor in the LDL form on both loops: the reference Python loop put in the
    # compiled loop's place (the same factor, the same packing), then the compiled loop
    from ferroquant.methods import gptq as gptq_mod

    assert gptq_native.LDL_FORM and gptq_native.has_ldl()
    assert gptq_native.CHOLESKY_DTYPE == torch.float32
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(gptq_native, "column_loop", gptq_mod._column_loop)
        ref = gptq_quantize(w, h, qtype, cfg, **kw)
    finally:
        mp.undo()
    return ref, gptq_quantize(w, h, qtype, cfg, **kw)


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q8_0", "int4_g64", "int3_g32_sym", "nf4",
                                   "fp4", "iq4_nl", "q4_k", "q6_k", "int8"])  # fmt: skip
def test_ldl_form_native_loop_stores_the_reference_loops_bytes(qtype):
    # static groups (act_order): the LDL form's path (natural order keeps the inverse factor)
    w, h = _problem(8, 512, seed=13)
    h[9, :] = 0.0  # a dead column
    h[:, 9] = 0.0
    cfg = GPTQConfig(act_order=True, block_size=96, scale_search=3)
    _same(*_both_ldl(w, h, qtype, cfg))
    _same(*_both_ldl(w, h, qtype, cfg, propagate=False))


def _toy_gptq_inverse(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # the textbook loop (float64, integer grid): e_i = (w_i - q_i) / U_ii, w_j -= U_ij e_i
    w, q = w.clone(), torch.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = torch.round(w[:, i])
        e = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i + 1 :] -= e[:, None] * u[i, i + 1 :]
    return q


def _toy_gptq_ldl(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # the LDL form: the error against the original weights, w_j -= M_ij (w_orig_i - q_i)
    w0, w, q = w, w.clone(), torch.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = torch.round(w[:, i])
        w[:, i + 1 :] -= (w0[:, i] - q[:, i])[:, None] * m[i, i + 1 :]
    return q


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), samples=st.sampled_from([0.5, 3.0]), seed=st.integers(0, 2**16))
def test_ldl_update_is_the_inverse_factors_algorithm(n, samples, seed):
    """In float64, `_ldl_update`'s M and the reference's U = chol(H^-1) (three float64
    factorizations) describe the same loop: M^-1 = -U / diag(U) (rows), and the textbook loop
    on U and the LDL-form loop on M choose the same codes."""
    from ferroquant.methods.gptq import _ldl_update, _upper_inverse_factor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(1, int(samples * n)), n, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    h.diagonal().add_(0.01 * float(h.diagonal().mean()) + 1e-6)
    u = _upper_inverse_factor(h)
    m = _ldl_update(h)
    assert u is not None and m is not None
    assert torch.equal(m, torch.triu(m)) and bool((m.diagonal() == -1).all())
    cond = float(torch.linalg.cond(h))
    want = -u / u.diagonal()[:, None]
    tol = 1e-12 * cond * float(want.abs().max())
    torch.testing.assert_close(torch.linalg.inv(m), want, rtol=0, atol=tol)
    w = torch.randn(6, n, generator=g, dtype=torch.float64) * 3.0
    assert torch.equal(_toy_gptq_ldl(w, m), _toy_gptq_inverse(w, u))


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_layout_changes_equal_torch_indexing(rows, cols, seed):
    # the Rust gather-transposes are copies: the same values as torch's indexing, bit for bit
    assert hasattr(_native, "gptq_gather_t")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    perm = torch.randperm(cols, generator=g)
    wt = gptq_native.solve_order(w, perm)
    assert torch.equal(wt, w.t()[perm].contiguous())
    inv = torch.argsort(perm)
    assert torch.equal(gptq_native.natural_order(wt, inv), w)
    with pytest.raises(Exception, match="outside"):
        _native.gptq_gather_t(w.numpy(), np.array([cols], dtype=np.int64))
    if cols > 1:
        with pytest.raises(Exception, match="permutation"):
            _native.gptq_gather_t(w.numpy(), np.zeros(cols, dtype=np.int64))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_permuted_hessian_equals_torch_conversion_and_indexing(n, seed):
    # one Rust pass against torch's float32 conversion and index_select, bit for bit (values
    # whose rounding to float32 is not exact, subnormal and beyond float32's range included)
    assert hasattr(_native, "gptq_permute_f32")
    g = torch.Generator().manual_seed(seed)
    h = (
        torch.randn(n, n, generator=g, dtype=torch.float64)
        * 10.0 ** torch.randint(-45, 45, (n, n), generator=g).double()
    )
    order = torch.randperm(n, generator=g)
    ref = h.to(torch.float32).index_select(0, order).index_select(1, order)
    got = gptq_native.permuted_f32(h, order)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    bad = np.zeros(n, np.int64) if n > 1 else np.ones(1, np.int64)  # a repeat / out of range
    with pytest.raises(Exception, match="permutation"):
        _native.gptq_permute_f32(h.numpy(), bad)
    with pytest.raises(Exception, match="square"):
        _native.gptq_permute_f32(np.zeros((n, n + 1)), order.numpy())
