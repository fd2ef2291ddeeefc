"""HQQ (methods/hqq.py): the solver against the `hqq` package live, the stored tensor against
the solver, the invariant against RTN, determinism, bad input."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
import ferroquant.gguf
from ferroquant.methods import HQQConfig, hqq_quantize, method_config
from ferroquant.methods.hqq import solve_zero
from ferroquant.tensor import QuantizeError

from peers import require, smollm2_gguf


@lru_cache(maxsize=1)
def _down_proj() -> np.ndarray:
    """A real weight: 128 rows of SmolLM2's first down_proj (576 x 1536), dequantized."""
    with fq.gguf.open(smollm2_gguf()) as f:
        return np.ascontiguousarray(f.tensors["blk.0.ffn_down.weight"].dequantize()[:128])


def _rel(w: np.ndarray, r: np.ndarray) -> float:
    return float(np.linalg.norm(w - r.reshape(w.shape)) / np.linalg.norm(w))


def _pkg(w: torch.Tensor, bits: int, optimize: bool = True) -> tuple[torch.Tensor, dict]:
    hq = require("hqq.core.quantize")
    return hq.Quantizer.quantize(w, nbits=bits, group_size=64, axis=1, device="cpu",
                                 bitpack=False, optimize=optimize)  # fmt: skip


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_reference_solver_matches_hqq_package(bits: int) -> None:
    """The scalar reference (rust/core/src/hqq) against the package's solver, live, same tensor,
    same settings (kappa=1: the package's legacy solver keeps beta fixed).

    What may differ: only the order of the f32 sums (torch's vectorised reductions vs our 8
    interleaved lanes; the tensor mean in f32 vs f64) and torch's vectorised pow vs libm's powf
    (both within an ulp or two). A zero is a mean of 64 terms of size <= maxq + |w| s, so these
    move it by ~1e-6 in code units (measured: <= 2e-6): zeros agree to 1e-4 (50x that). A code
    flips only where w s + z lies within that of a rounding boundary (measured on all of
    blk.0 ffn_down: 2 codes in 884,736 at 3 bits, none at 2 and 4), and a flipped code moves
    its group's next zero by 1/64 of a step; so up to 1 group in 1000 may differ by more, and
    the relative Frobenius errors agree to 1e-5 relative (measured <= 3e-7; our gains over RTN
    are 4 orders larger)."""
    w = torch.from_numpy(_down_proj())
    wq, meta = _pkg(w, bits)
    g = w.reshape(-1, 64)
    inv, zero = solve_zero(g, bits, HQQConfig(kappa=1.0), reference=True)
    np.testing.assert_allclose(inv, (1.0 / meta["scale"]).numpy(), rtol=1e-6)
    assert np.mean(np.abs(zero - meta["zero"].numpy()) > 1e-4) <= 1e-3
    q = np.clip(np.round(g.numpy() * inv + zero), 0, (1 << bits) - 1)
    assert np.mean(q != wq.numpy().reshape(q.shape)) < 1e-4
    ours = _rel(w.numpy(), (q - zero) / inv)
    theirs = _rel(w.numpy(), ((wq.float() - meta["zero"]) * meta["scale"]).numpy())
    assert abs(ours - theirs) <= 1e-5 * theirs, (ours, theirs)
    rtn_wq, rtn_meta = _pkg(w, bits, optimize=False)
    assert theirs < _rel(
        w.numpy(), ((rtn_wq.float() - rtn_meta["zero"]) * rtn_meta["scale"]).numpy()
    )


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_fast_solver_is_bit_identical_to_the_reference(bits: int) -> None:
    """Fused, threaded, AVX2 path vs the scalar reference on the real tensor (bit for bit), at
    every thread count; with kappa 1.01 (the default) and 1."""
    g = _down_proj().reshape(-1, 64)
    for kappa in (1.01, 1.0):
        cfg = HQQConfig(kappa=kappa)
        ref = solve_zero(g, bits, cfg, reference=True)
        before = fq._native.num_threads()
        try:
            for threads in (1, 2, 3):
                fq._native.set_num_threads(threads)
                fast = solve_zero(g, bits, cfg)
                for a, b in zip(ref, fast, strict=True):
                    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        finally:
            fq._native.set_num_threads(before)


@pytest.mark.parametrize("qtype", ["int4_g64", "int3_g128", "int2_g32", "int4_gch"])
def test_stored_tensor_beats_rtn_and_decodes_to_solver_values(qtype: str) -> None:
    w = _down_proj()
    qt = hqq_quantize(w, qtype)
    assert qt.qtype == qtype
    back = fq.dequantize(qt).reshape(w.shape)
    rtn = fq.dequantize(fq.quantize(w, qtype)).reshape(w.shape)
    assert _rel(w, back) <= _rel(w, rtn)
    # the bytes are an ordinary tensor: codes, fp16 scales and integer zeros decode exactly
    from ferroquant.models.packed_int import _parts

    gi, codes, scales, zeros = _parts(qt)
    assert np.array_equal(scales, scales.astype(np.float16).astype(np.float32))
    rep = qt.block_size
    expect = (codes - np.repeat(zeros, rep, 1)).astype(np.float32) * np.repeat(scales, rep, 1)
    assert np.array_equal(back, expect)


def test_int4_g64_improves_on_rtn_on_real_weights() -> None:
    """The measured gain on the real tensor (int zero + scale re-solve: benches/RESULTS.md)."""
    w = _down_proj()
    ours = _rel(w, fq.dequantize(hqq_quantize(w, "int4_g64")))
    rtn = _rel(w, fq.dequantize(fq.quantize(w, "int4_g64")))
    assert ours < 0.97 * rtn


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 3),
    bits=st.sampled_from([2, 3, 4]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e2),
    outliers=st.booleans(),
)
def test_squared_error_never_above_rtn_per_group(rows, groups, bits, seed, scale, outliers) -> None:
    """The invariant by construction: each group keeps the pair with the smaller squared error,
    RTN's pair being a candidate. (The lp objective alone does not bound the L2 error.)"""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, 32 * groups)) * scale).astype(np.float32)
    if outliers:
        w[rng.random(w.shape) < 0.05] *= 20
    qtype = f"int{bits}_g32"
    ours = fq.dequantize(hqq_quantize(w, qtype)).reshape(w.shape)
    rtn = fq.dequantize(fq.quantize(w, qtype)).reshape(w.shape)
    e_ours = ((ours - w).astype(np.float64) ** 2).reshape(rows, groups, 32).sum(-1)
    e_rtn = ((rtn - w).astype(np.float64) ** 2).reshape(rows, groups, 32).sum(-1)
    assert np.all(e_ours <= e_rtn * (1 + 1e-6) + 1e-30)


def test_deterministic() -> None:
    w = _down_proj()[:32]
    a, b = hqq_quantize(w, "int4_g64"), hqq_quantize(torch.from_numpy(w.copy()), "int4_g64")
    assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert np.array_equal(np.asarray(a.stats), np.asarray(b.stats))


def test_constant_and_zero_groups() -> None:
    w = np.zeros((2, 64), np.float32)
    w[1] = 0.25
    back = fq.dequantize(hqq_quantize(w, "int4_g64")).reshape(w.shape)
    assert np.allclose(back, w, atol=1e-3)


@pytest.mark.parametrize(
    ("qtype", "match"),
    [("int4_g64_sym", "has none"), ("q6_k", "has none"), ("q4_0", "has none"), ("nope", "nope")],
)
def test_refuses_formats_without_zero_points(qtype: str, match: str) -> None:
    with pytest.raises(QuantizeError, match=match):
        hqq_quantize(np.ones((2, 64), np.float32), qtype)


def test_bad_input() -> None:
    with pytest.raises(QuantizeError, match="2-D"):
        hqq_quantize(np.ones(64, np.float32), "int4_g64")
    w = np.ones((2, 64), np.float32)
    w[0, 3] = np.nan
    with pytest.raises(QuantizeError, match="non-finite"):
        hqq_quantize(w, "int4_g64")
    with pytest.raises(QuantizeError, match="lp_norm"):
        method_config("hqq", lp_norm=2.0)
    with pytest.raises(QuantizeError, match="unknown hqq option"):
        method_config("hqq", betta=3)


def test_quantize_model_method_hqq() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    ref = model[0].weight.detach().numpy().copy()
    fq.quantize_model(model, "int4_g32", method="hqq", skip=(), progress=False)
    assert model.ferroquant_method.startswith("hqq(")
    assert model.ferroquant_plan == {"0": "int4_g32", "2": "int4_g32"}
    expect = fq.dequantize(hqq_quantize(ref, "int4_g32")).reshape(ref.shape)
    # read the weights back through the kernel 4 rows at a time: below the bf16 GEMM's
    # threshold (qmatmul_bf16_min_m: 12 rows, 8 with AMX bf16, 32 on AVX2 + FMA), whose bf16
    # weights would not be the format's
    x = torch.eye(64)
    got = torch.cat([model[0](x[i : i + 4]) - model[0].bias for i in range(0, 64, 4)])
    got = got.detach().numpy().T
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)


def test_cli_convert_refuses_hqq_for_gguf(tmp_path, capsys) -> None:
    """HQQ writes grouped integer checkpoints; a GGUF target is refused before anything is read,
    and no output file appears."""
    from ferroquant import cli

    out = tmp_path / "out.gguf"
    assert cli.main(["convert", str(tmp_path), str(out), "--method", "hqq"]) == 2
    assert "--method hqq" in capsys.readouterr().err
    assert not out.exists()


def test_eval_row_names_hqq() -> None:
    from ferroquant.eval.run import row_spec

    spec = row_spec("int4_g64+hqq")
    assert (spec.recipe, spec.options) == ("int4_g64", {"method": "hqq"})
    with pytest.raises(QuantizeError):
        row_spec("int9_g64+hqq")


def _heavy_tailed(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, (rows, cols)) * 0.02).astype(np.float32)


def _decode_by_peers(qt, qtype: str) -> list[np.ndarray]:
    """gguf-py's decode, and for the K-quants also libggml's own dequantize_row_qN_K."""
    import peers

    data = np.asarray(qt.data, np.uint8)
    rows = data.reshape(qt.rows, -1)
    out = [np.asarray(peers.gguf_quants().dequantize(rows, peers.gguf_qtype(qtype)), np.float32)]
    if qtype.endswith("_k"):
        import ctypes

        fn = getattr(peers.libggml(), "dequantize_row_" + qtype[:2] + "_K")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        y = np.empty(qt.rows * qt.cols, np.float32)
        fn(np.ascontiguousarray(data).ctypes.data, y.ctypes.data, y.size)
        out.append(y)
    return [o.reshape(qt.shape) for o in out]


# the measured gain on this heavy-tailed sample (relative error vs RTN): q4_1/q5_1 keep HQQ's
# zero as the block minimum; the K-quants lose part of it to the 6-/4-bit sub-block scales
_GAIN = {"q4_1": 0.95, "q5_1": 0.95, "q2_k": 1.0, "q4_k": 1.0, "q5_k": 1.0}


@pytest.mark.parametrize("qtype", ["q4_1", "q5_1", "q2_k", "q4_k", "q5_k"])
def test_ggml_min_formats_store_hqq_in_their_own_fields(qtype: str) -> None:
    """q4_1 / q5_1 keep HQQ's float zero as the block minimum (fp16); the K-quants its
    sub-block scales and mins, quantized the format's way: ordinary ggml tensors that gguf-py
    (and libggml, for the K-quants) decode to our values, with a smaller error than RTN."""
    w = _heavy_tailed(64, 512)
    qt = hqq_quantize(w, qtype)
    ours = fq.dequantize(qt).reshape(w.shape)
    for ref in _decode_by_peers(qt, qtype):
        assert np.array_equal(ours, ref)
    rtn = fq.dequantize(fq.quantize(w, qtype)).reshape(w.shape)
    assert _rel(w, ours) < _GAIN[qtype] * _rel(w, rtn)


@settings(max_examples=20, deadline=None)
@given(
    qtype=st.sampled_from(["q4_1", "q5_1", "q2_k", "q4_k", "q5_k"]),
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e2),
)
def test_ggml_squared_error_never_above_rtn_per_block(qtype, blocks, seed, scale) -> None:
    n = 256 if qtype.endswith("_k") else 32
    w = (_heavy_tailed(2, n * blocks, seed) * np.float32(scale)).astype(np.float32)
    ours = fq.dequantize(hqq_quantize(w, qtype)).reshape(w.shape)
    rtn = fq.dequantize(fq.quantize(w, qtype)).reshape(w.shape)
    e_ours = ((ours - w).astype(np.float64) ** 2).reshape(-1, n).sum(-1)
    e_rtn = ((rtn - w).astype(np.float64) ** 2).reshape(-1, n).sum(-1)
    assert np.all(e_ours <= e_rtn)


def test_quantize_model_hqq_keeps_rtn_where_the_recipe_falls_back() -> None:
    """q4_k on a 64-column Linear falls back to q5_0 (no zero point): that weight is RTN, the
    256-column one is HQQ q4_k."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    w0, w2 = (model[i].weight.detach().numpy().copy() for i in (0, 2))
    fq.quantize_model(model, "q4_k", method="hqq", skip=(), progress=False)
    assert model.ferroquant_plan == {"0": "q4_k", "2": "q5_0"}
    assert np.array_equal(
        np.asarray(model[0].qtensor().data), np.asarray(hqq_quantize(w0, "q4_k").data)
    )
    assert np.array_equal(
        np.asarray(model[2].qtensor().data), np.asarray(fq.quantize(w2, "q5_0").data)
    )


def test_hqq_tensor_exports_as_gptq_and_awq_unchanged() -> None:
    """Integer zeros and fp16 scales: the GPTQ (v1) and AWQ packings carry the tensor exactly."""
    from ferroquant.models import packed_int

    qt = hqq_quantize(_heavy_tailed(16, 128, 3), "int4_g64")
    for back in (
        packed_int.from_gptq(packed_int.to_gptq(qt), 4, 64, sym=False),
        packed_int.from_awq(packed_int.to_awq(qt), 4, 64),
    ):
        assert back.qtype == qt.qtype
        assert np.array_equal(np.asarray(back.data), np.asarray(qt.data))
        assert np.array_equal(np.asarray(back.stats), np.asarray(qt.stats))
