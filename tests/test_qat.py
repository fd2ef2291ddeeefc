"""QAT (ferroquant.train): the torch fake quantization equals the Rust reference's
dequantize(quantize(w)) bit for bit for every qtype; the activation rounding equals the CPU
kernel's (read back through the kernel itself); `convert` gives QuantLinear outputs equal to the
fake-quant forward bit for bit; the STE gradient and its clip mask; bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ferroquant as fq
from ferroquant.nn import QuantLinear
from ferroquant.train import qat
from ferroquant.train.fake_quant import (
    TORCH_QTYPES,
    fake_quantize_activation,
    fake_quantize_weight,
    ternary,
)

ALL_QTYPES = [q.name for q in fq.qtypes()]
KERNEL_QTYPES = [q for q in ALL_QTYPES if fq.nn.ops.native_kernel_available(q)]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _assert_same_as_rust(w: torch.Tensor, qtype: str) -> None:
    ref = fq.dequantize(fq.quantize(w.contiguous(), qtype))
    got = fake_quantize_weight(w, qtype)[0].numpy()
    diff = _bits(got) != _bits(ref)
    assert not diff.any(), (
        f"{qtype}: {int(diff.sum())} of {diff.size} values differ, first at "
        f"{np.argwhere(diff)[0].tolist()}: torch {got[diff][0]!r} rust {ref[diff][0]!r}"
    )


def test_every_qtype_has_a_fake_quantization():
    # the torch list plus the Rust-backed ones cover the table: a new format must be placed
    assert set(ALL_QTYPES) >= TORCH_QTYPES
    from ferroquant.qtypes import gint_params, is_float_zero

    searched = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0"}
    grouped = {q for q in ALL_QTYPES if gint_params(q) is not None}
    float_zero = {q for q in ALL_QTYPES if is_float_zero(q)}
    assert (len(grouped), len(float_zero)) == (28, 9)
    assert searched | grouped | float_zero == set(ALL_QTYPES) - TORCH_QTYPES


@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_fake_quant_equals_rust_reference_on_fresh_data(qtype):
    g = torch.Generator().manual_seed(hash(qtype) % 2**31)
    for scale in (1e-3, 0.05, 3.0):
        w = torch.randn(24, 512, generator=g) * scale
        w[:, ::7] *= 20  # outliers, as trained weights have
        _assert_same_as_rust(w, qtype)


# Values that stress the roundings: zeros of both signs, exact ties of +-a, powers of two,
# values on rounding midpoints, the f16 limit, tiny normals and subnormals.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.25, 65504.0, -65504.0, 1e-30, -1e-30, 1e-42,
           -3e-39, 7.5, -7.5, 8.5, 0.0625, 1e4, -1e-4]  # fmt: skip


@st.composite
def weight_rows(draw):
    """2 rows of 256: a drawn pattern of 64 values tiled, with whole blocks of one kind
    (constant, +-a ties, special values, mixed with arbitrary floats)."""
    kind = draw(st.sampled_from(["special", "constant", "ties", "mixed"]))
    if kind == "constant":
        v = draw(st.sampled_from(SPECIAL + [draw(st.floats(-1e3, 1e3, width=32))]))
        x = np.full(64, v, np.float32)
    elif kind == "ties":
        a = draw(st.floats(9.999999682655225e-21, 6e4, width=32))
        x = draw(st.lists(st.sampled_from([a, -a, 0.0, a / 2, -a / 3]), min_size=64, max_size=64))
    else:
        elems = st.sampled_from(SPECIAL)
        if kind == "mixed":
            elems = st.one_of(elems, st.floats(-6e4, 6e4, width=32, allow_subnormal=True))
        x = draw(st.lists(elems, min_size=64, max_size=64))
    row = np.tile(np.asarray(x, np.float32), 4)
    return torch.from_numpy(np.stack([row, row[::-1].copy()]))


@pytest.mark.parametrize("qtype", sorted(TORCH_QTYPES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=weight_rows())
def test_fake_quant_equals_rust_reference_on_edge_cases(qtype, w):
    _assert_same_as_rust(w, qtype)


@pytest.mark.parametrize("qtype", ["q4_k", "iq4_xs", "q2_k"])
@settings(max_examples=10, deadline=None)
@given(w=weight_rows())
def test_rust_backed_formats_pass_the_same_edge_cases(qtype, w):
    _assert_same_as_rust(w, qtype)


def test_bad_values_are_refused_as_the_rust_quantizer_does():
    w = torch.zeros(2, 32)
    w[1, 3] = 7e4
    with pytest.raises(fq.QuantizeError, match="row 1, column 3 is beyond q4_0's range"):
        fake_quantize_weight(w, "q4_0")
    w = torch.zeros(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(fq.QuantizeError, match="row 1, column 3 is not finite"):
        fake_quantize_weight(w, "nf4")


# ------------------------------------------------------------------ activations vs the kernel


def _kernel(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    with torch.no_grad():
        return QuantLinear.from_linear(lin, qtype)(x)


@st.composite
def activations(draw):
    k = draw(st.sampled_from([64, 256, 320]))
    kind = draw(st.sampled_from(["normal", "special"]))
    if kind == "normal":
        scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
        seed = draw(st.integers(0, 2**16))
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed)) * scale
    else:
        vals = st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.5, 127.0, 1e-3, -1e-30, 3.0])
        x = torch.tensor(draw(st.lists(vals, min_size=3 * k, max_size=3 * k))).reshape(3, k)
    return x.float()


@settings(max_examples=25, deadline=None)
@given(x=activations())
def test_q8_0_activation_rounding_is_the_kernels(x):
    # A q4_0 weight row whose only nonzero is -8 (block scale exactly 1, level 0) picks one
    # activation: y = (1 * d_x) * (-8 q_x), and a power of two times a float is exact, so
    # -y / 8 is the kernel's rounded activation itself.
    k = x.shape[1]
    w = torch.zeros(k, k)
    w[torch.arange(k), torch.arange(k)] = -8.0
    y = _kernel(x, w, "q4_0")
    want = fake_quantize_activation(x, "q4_0")
    assert torch.equal(y / -8.0, want + 0.0), (y / -8.0 - want).abs().max()


@settings(max_examples=25, deadline=None)
@given(x=activations())
def test_q16_activation_rounding_is_the_kernels(x):
    # int8 rows (one scale a row) with 127 at column 0 (scale 1) and 64 on the diagonal:
    # y[j] = 64 * (q_x[j] * d_x) exactly, once x's column 0 is zero (so 127 adds nothing).
    x = x.clone()
    x[:, 0] = 0.0
    k = x.shape[1]
    w = torch.zeros(k, k)
    w[:, 0] = 127.0
    w[torch.arange(1, k), torch.arange(1, k)] = 64.0
    y = _kernel(x, w, "int8")
    want = fake_quantize_activation(x, "int8")
    assert torch.equal(y[:, 1:] / 64.0, want[:, 1:] + 0.0), (
        (y[:, 1:] / 64 - want[:, 1:]).abs().max()
    )


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "iq4_xs"])
def test_q8_k_activation_rounding_matches_the_kernel_to_float_order(qtype):
    # q8_K cannot be read back through a one-hot K-quant row; instead the torch forward with the
    # rounded activations must land within float-summation distance of the kernel, far closer
    # than with float activations (which differ by the activation rounding itself).
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 512, generator=g), torch.randn(64, 512, generator=g) * 0.05
    y = _kernel(x, w, qtype)
    wq = torch.from_numpy(fq.dequantize(fq.quantize(w, qtype)))
    rounded = (fake_quantize_activation(x, qtype) @ wq.T - y).abs().max()
    unrounded = (x @ wq.T - y).abs().max()
    assert rounded < 1e-5 * y.abs().max() and rounded * 20 < unrounded


# ------------------------------------------------------------------ modules


def _mlp(seed: int = 0, width: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, width), nn.GELU(), nn.Linear(width, 256, bias=False))


@pytest.mark.parametrize("qtype", ALL_QTYPES + ["q4_k_m", "ternary"])
def test_convert_gives_the_fake_quant_forward_bit_for_bit(qtype):
    m = qat.prepare(_mlp(), qtype, skip=())
    x = torch.randn(5, 7, 256)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    m(x).pow(2).mean().backward()
    opt.step()  # convert must use the current weights
    with torch.no_grad():
        y_fake = m(x)
    qat.convert(m)
    kinds = {type(mod).__name__ for mod in m}
    assert ("QuantLinear" in kinds) == (qtype != "ternary")
    with torch.no_grad():
        y = m(x)
    assert torch.equal(y, y_fake)


@pytest.mark.parametrize("fmt", ["tq1_0", "tq2_0"])
def test_ternary_converts_to_ggml_ternary_keeping_the_pattern(fmt):
    """convert(ternary_as=tq*): the stored weights are the trained {-1, 0, 1} pattern times
    f16(gamma) (256-wide rows), or q8_0 holding gamma * {-1, 0, 1} (other rows)."""
    m = qat.prepare(nn.Sequential(nn.Linear(256, 96), nn.Linear(96, 256)), "ternary", skip=())
    want = [ternary(lin.weight)[0] for lin in m]
    qat.convert(m, ternary_as=fmt)
    assert [lin.qtype for lin in m] == [fmt, "q8_0"]
    for lin, w in zip(m, want, strict=True):
        got = torch.from_numpy(fq.dequantize(lin.qtensor())).reshape(w.shape)
        gamma = w.abs().max()
        assert torch.equal(torch.sign(got), torch.sign(w))
        assert torch.allclose(got.abs()[w != 0], gamma, rtol=2**-10, atol=0)
    with pytest.raises(fq.QuantizeError, match="ternary_as"):
        qat.convert(qat.prepare(_mlp(), "ternary", skip=()), ternary_as="q4_0")


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "nf4", "int8", "iq4_nl", "q5_1"])
def test_torch_mode_rounds_as_the_kernel_mode(qtype):
    torch.manual_seed(3)
    a = qat.prepare(_mlp(), qtype, skip=(), mode="torch")
    b = qat.prepare(_mlp(), qtype, skip=(), mode="kernel")
    x = torch.randn(4, 256)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-5 * yb.abs().max()


def test_ste_gradient_is_masked_where_q4_0_clips():
    lin = nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = -1.0  # the block's max: d = 1/8, the grid reaches +7/8
        lin.weight[0, 1] = 0.99  # beyond +7.5/8: clipped to 7/8
        lin.weight[0, 2] = 0.5
    m = qat.prepare(nn.Sequential(lin), "q4_0", skip=())
    x = torch.ones(3, 32)
    m(x).sum().backward()
    g = m[0].weight.grad[0]
    assert g[1] == 0 and g[0] == 3 and g[2] == 3 and g[5] == 3


def test_input_gradient_flows_through_the_quantized_weight():
    m = qat.prepare(_mlp(), "q4_0", skip=())
    x = torch.randn(2, 256, requires_grad=True)
    m[0](x).sum().backward()
    wq, _ = fake_quantize_weight(m[0].weight, "q4_0")
    assert torch.allclose(x.grad, wq.sum(0).expand(2, -1), rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_scales_follow_the_weights():
    torch.manual_seed(0)
    teacher = _mlp(1, 64)
    m = qat.prepare(_mlp(2, 64), "q4_0", skip=())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x = torch.randn(16, 256)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(15):
        loss = (m(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    w = m[0].weight
    with torch.no_grad():  # the forward quantizes the weights as they are now
        want = fq.dequantize(fq.quantize(w.detach().contiguous(), "q4_0"))
        assert np.array_equal(fake_quantize_weight(w, "q4_0")[0].numpy(), want)


def test_ternary_is_bitnet_absmean():
    w = torch.randn(16, 64)
    v, keep = ternary(w)
    gamma = w.abs().mean()
    assert set(torch.unique(v / gamma).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(v, torch.round(w / (gamma + 1e-5)).clamp(-1, 1) * gamma)
    assert torch.equal(keep, (w / (gamma + 1e-5)).abs() <= 1.5)


def test_recipes_pick_per_layer_types_on_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ptq = fq.quantize_model(copy.deepcopy(model), "q4_k_m", progress=False).ferroquant_plan
    qat.prepare(model, "q4_k_m")
    p = model.ferroquant_qat_plan
    assert p == ptq  # the same per-tensor rules as post-training quantization
    assert p["lm_head"] is None and type(model.lm_head) is nn.Linear
    assert p["model.layers.0.self_attn.q_proj"] == "q4_k" and len(set(p.values())) > 2
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        qat.convert(model)
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_bad_input_is_one_clear_error_and_changes_nothing():
    with pytest.raises(fq.QuantizeError, match="no nn.Linear layers"):
        qat.prepare(nn.Sequential(nn.ReLU(), nn.Embedding(4, 4)), "q4_0")
    m = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 8))
    with pytest.raises(fq.QuantizeError, match=r"^1: row length 64 .* q4_k's block size 256"):
        qat.prepare(m, "q4_k", skip=())
    assert all(type(mod) is nn.Linear for mod in m)
    with pytest.raises(fq.QuantizeError, match="unknown qtype or mix 'q9_9'"):
        qat.prepare(m, "q9_9")
    with pytest.raises(fq.QuantizeError, match="call qat.prepare first"):
        qat.convert(m)
    with pytest.raises(ValueError, match="mode must be one of"):
        qat.prepare(m, "q4_0", mode="fast")
    assert all(type(mod) is nn.Linear for mod in m)
