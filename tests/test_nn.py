"""QuantLinear, the ferroquant::qmatmul op and quantize_model (torch)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ferroquant as fq  # noqa: E402
from ferroquant.models.recipes import fit, recipe_for, use_more_bits  # noqa: E402
from ferroquant.nn import QuantLinear  # noqa: E402

LEGACY = ["q8_0", "q4_0", "q5_1"]


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _error_bound(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """Per output element, the most that x @ w.T can move when the native kernel runs: the
    activations are rounded to 8 bits per block of 32 (ggml's q8_0 / q8_1: an error of at most
    half a step, amax/127/2, per element), then products are summed in float32 (at most
    (K + 6) * 2^-24 of sum |x||w|). Derived from the formats, not fitted to our output."""
    x64, w64 = x.double().numpy(), w.double().numpy()
    m, k = x64.shape
    half_step = np.abs(x64).reshape(m, k // 32, 32).max(axis=2) / 127 / 2  # (m, blocks)
    w_block_sums = np.abs(w64).reshape(w64.shape[0], k // 32, 32).sum(axis=2)  # (n, blocks)
    rounding = half_step @ w_block_sums.T * 1.001  # the step itself is rounded to f16/f32
    summing = (k + 6) * 2.0**-24 * ((np.abs(x64) + 2 * half_step.repeat(32, 1)) @ np.abs(w64).T)
    return rounding + summing


def _within_bound(y: torch.Tensor, ref: torch.Tensor, bound: np.ndarray) -> bool:
    return bool(np.all(np.abs(y.double().numpy() - ref.numpy()) <= bound))


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_matches_dequantized_linear(qtype, bias):
    lin = _linear(256, 48, bias)
    if bias:  # a bias of the size a trained layer has, so that losing it shows (see below)
        with torch.no_grad():
            lin.bias.copy_(torch.randn(48, generator=torch.Generator().manual_seed(1)) * 0.5)
    q = QuantLinear.from_linear(lin, qtype)
    x = torch.randn(5, 256)
    w = torch.from_numpy(fq.dequantize(fq.quantize(lin.weight.detach(), qtype)))
    ref = torch.nn.functional.linear(
        x.double(), w.double(), None if lin.bias is None else lin.bias.detach().double()
    )
    y = q(x).detach()
    assert y.shape == (5, 48) and y.dtype == torch.float32
    bound = _error_bound(x, w)
    excess = np.max(np.abs(y.double().numpy() - ref.numpy()) - bound)
    assert _within_bound(y, ref, bound), excess
    if bias:
        # The negative case: the same layer with its bias dropped must fail the same check.
        q.bias = None
        assert not _within_bound(q(x).detach(), ref, bound)


def test_leading_dims_and_dtypes_flow_through():
    q = QuantLinear.from_linear(_linear(64, 8), "q8_0")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = q(x).detach()
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16


def test_state_dict_round_trip_restores_format_and_outputs():
    q = QuantLinear.from_linear(_linear(128, 16), "q4_0")
    sd = q.state_dict()
    fresh = QuantLinear(128, 16, qtype="q8_0")
    fresh.load_state_dict(sd)
    assert fresh.qtype == "q4_0"
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), q(x))


def test_op_passes_torch_opcheck_and_traces():
    q = QuantLinear.from_linear(_linear(64, 8), "q8_0")
    x = torch.randn(4, 64)
    torch.library.opcheck(
        torch.ops.ferroquant.qmatmul.default,
        (x, q.qweight, q.qstats, "q8_0", 8, 64, 32, ""),
        test_utils=("test_schema", "test_faketensor"),
    )
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), q(x))


class TinyDecoder(nn.Module):
    """Named like a Hugging Face Llama: model.layers.N.{self_attn,mlp}.*, lm_head."""

    def __init__(self, n_layer: int = 8, d: int = 256, ff: int = 512) -> None:
        super().__init__()
        layers = []
        for _ in range(n_layer):
            blk = nn.Module()
            blk.self_attn = nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(blk.self_attn, p, nn.Linear(d, d, bias=False))
            blk.mlp = nn.Module()
            blk.mlp.gate_proj = nn.Linear(d, ff, bias=False)
            blk.mlp.up_proj = nn.Linear(d, ff, bias=False)
            blk.mlp.down_proj = nn.Linear(ff, d, bias=False)
            layers.append(blk)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(layers)
        self.lm_head = nn.Linear(d, 96, bias=False)


def test_recipe_rules_follow_llama_cpp():
    n = 32
    more = [i for i in range(n) if use_more_bits(i, n)]
    # first and last eighth, and every third layer in between (llama.cpp's use_more_bits)
    assert (
        more[:4] == [0, 1, 2, 3] and more[-4:] == [28, 29, 30, 31] and 6 in more and 5 not in more
    )
    r = recipe_for("q4_k_m")
    assert r.qtype_for("model.layers.0.self_attn.v_proj", (256, 256), n) == "q6_k"
    assert r.qtype_for("model.layers.5.self_attn.v_proj", (256, 256), n) == "q4_k"
    assert r.qtype_for("model.layers.5.self_attn.q_proj", (256, 256), n) == "q4_k"
    assert r.qtype_for("lm_head", (96, 256), n) is None
    assert fit("q4_k", 384) == "q5_0" and fit("q6_k", 96) == "q8_0" and fit("q2_k", 32) == "q4_0"
    assert recipe_for("q8_0").qtype_for("model.layers.3.mlp.up_proj", (512, 256), n) == "q8_0"
    with pytest.raises(fq.QuantizeError) as e:
        recipe_for("q7_x")
    # the message names what is accepted: the mixes the README recommends, and the qtypes
    assert "q7_x" in str(e.value) and "q4_k_m" in str(e.value) and "q5_k_m" in str(e.value)
    assert all(q.name in str(e.value) for q in fq.qtypes())


def test_quantize_model_replaces_linears_and_keeps_outputs_close():
    torch.manual_seed(0)
    model = TinyDecoder(n_layer=2, d=64, ff=128)
    x = torch.randn(3, 64)
    ref = model.model.layers[1].mlp.down_proj(model.model.layers[0].mlp.up_proj(x))
    fq.quantize_model(model, "q8_0", progress=False)
    plan = model.ferroquant_plan
    assert plan["lm_head"] is None and isinstance(model.lm_head, nn.Linear)
    assert all(q == "q8_0" for name, q in plan.items() if name != "lm_head")
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    y = model.model.layers[1].mlp.down_proj(model.model.layers[0].mlp.up_proj(x))
    assert (y - ref).abs().max() <= 0.05 * ref.abs().max()


def test_quantize_model_with_a_filter_and_no_bias_module():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    fq.quantize_model(model, "q4_0", skip=(), filter_fn=lambda n, m: n != "2", progress=False)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], nn.Linear)
    assert np.isfinite(model(torch.randn(2, 64)).detach().numpy()).all()
