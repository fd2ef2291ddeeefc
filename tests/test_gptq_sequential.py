"""GPTQ's true-sequential and asymmetric (GPTAQ) statistics: the least-squares target, the
moments against the capture's own, and the model entry point.

Provenance: the asymmetric target is checked against its defining normal equations
(W* H = W (H + D)), not against our own output; the recomputed Hessian of an untouched layer
must equal the capture's bit for bit (same shards, same sums)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.methods import GPTQConfig, gptq_quantize
from ferroquant.methods.gptq import asymmetric_target

torch = pytest.importorskip("torch")


def _pair(cols: int, n: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64)
    xf = x + noise * torch.randn(n, cols, generator=g, dtype=torch.float64)
    h = 2.0 / n * x.T @ x
    d = 2.0 / n * (xf - x).T @ x
    w = torch.randn(8, cols, generator=g, dtype=torch.float64)
    return w, x, xf, h, d


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([16, 64]), st.floats(0.0, 0.5))
def test_asymmetric_target_solves_the_normal_equations(seed, cols, noise):
    w, _, _, h, d = _pair(cols, 4 * cols, noise, seed)
    target = asymmetric_target(w.float(), h, d, 1.0, 0.0, "w").double()
    lhs, rhs = target @ h, w @ (h + d)
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * float(rhs.abs().max()))


def test_asymmetric_gptq_matches_the_float_outputs_better_and_alpha_0_is_plain_gptq():
    w, x, xf, h, d = _pair(256, 2048, 0.3, 0)
    w, h, d = w.float(), h.float(), d.float()
    _, plain = gptq_quantize(w, h, "q4_0", GPTQConfig())
    _, zero = gptq_quantize(w, h, "q4_0", GPTQConfig(asym_alpha=0.0), cross=d)
    assert torch.equal(plain, zero)
    _, asym = gptq_quantize(w, h, "q4_0", GPTQConfig(asym_alpha=1.0), cross=d)

    def err(q):
        return float((xf.float() @ w.T - x.float() @ q.T).pow(2).mean())

    assert err(asym) < 0.98 * err(plain)
    with pytest.raises(fq.QuantizeError, match="cross moment of shape"):
        gptq_quantize(w, h, "q4_0", GPTQConfig(asym_alpha=0.5), cross=d[:10, :10])


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_recomputed_moments_of_an_untouched_layer_are_the_capture_s_bits():
    pytest.importorskip("transformers")
    from ferroquant.calib.capture import (
        LocalWindows,
        collect_stats,
        find_decoder_layers,
        first_layer_inputs,
    )
    from ferroquant.methods.gptq_sequential import group_moments

    model = _tiny()
    ids = torch.randint(0, 320, (12, 32), generator=torch.Generator().manual_seed(0))
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, ids)
        stats = collect_stats(layers[0], calls[0], hidden, "l0")
        fp = copy.deepcopy(layers[0])
        for names, h, _ in stats.groups():
            h2, d = group_moments(LocalWindows(calls[0], hidden), layers[0], names[0], fp, hidden)
            assert torch.equal(h, h2)
            assert d is not None and not d.any()  # same inputs: no mismatch


@pytest.mark.parametrize("options", [{"true_sequential": True}, {"asym_alpha": 0.25},
                                     {"true_sequential": True, "asym_alpha": 0.25}])  # fmt: skip
def test_quantize_model_sequential_gptq_keeps_the_plan_and_beats_rtn(options):
    pytest.importorskip("transformers")
    model = _tiny()
    ids = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    rtn = fq.quantize_model(copy.deepcopy(model), "q4_0", progress=False)
    cfg = {"n_samples": 8, "seq_len": 64, **options}
    out = fq.quantize_model(copy.deepcopy(model), "q4_0", method="gptq", calibration=ids,
                            config=cfg, progress=False)  # fmt: skip
    assert out.ferroquant_plan == rtn.ferroquant_plan
    for k, v in options.items():
        assert f"{k}={v}" in out.ferroquant_method
    with torch.no_grad():
        ref = model(ids).logits
        assert (out(ids).logits - ref).pow(2).mean() < (rtn(ids).logits - ref).pow(2).mean()


def test_the_plain_layerwise_entry_point_refuses_the_sequential_options():
    """`layerwise.gptq_model` solves on the capture's statistics only: the options that need
    their own statistics go through `sequential_gptq_model` (as `quantize_model` routes them,
    on any runner), never silently ignored."""
    pytest.importorskip("transformers")
    from ferroquant.methods.layerwise import gptq_model

    ids = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    with pytest.raises(fq.QuantizeError, match="true_sequential / asym_alpha"):
        gptq_model(_tiny(), lambda n, m: "q4_0", ids, GPTQConfig(asym_alpha=0.25), {})
