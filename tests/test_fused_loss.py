"""The fused, chunked lm_head + cross-entropy (ferroquant.train.fused_loss): in float32 it is
torch's `F.cross_entropy(h @ W.T)` and its gradient up to float32 summation order; in bfloat16
within the derived bound of the exact (float64) loss and gradient; through a QLoRA model it gives
the model's own loss and LoRA gradients; where it does not apply, the model's own loss runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.nn import QuantLinear
from ferroquant.train.fused_loss import (
    base_compute_dtype,
    causal_lm_loss,
    fused_head,
    linear_cross_entropy,
)

pytest.importorskip("peft")
U32 = 2.0**-24  # float32 unit roundoff
BF16_U = 2.0**-8  # bfloat16 unit roundoff


def _problem(n: int, v: int, k: int, ignored: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, k, generator=g)
    w = torch.randn(v, k, generator=g) * (2.0 / math.sqrt(k))  # logits of order 1..10
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return h, w, labels


def _exact(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
    """float64 loss, its gradient with respect to h, and |h| |W|^T (the GEMM bounds' scale)."""
    h64 = h.double().requires_grad_()
    loss = F.cross_entropy(h64 @ w.double().t(), labels, ignore_index=-100)
    (grad,) = torch.autograd.grad(loss, h64) if labels.ne(-100).any() else (torch.zeros_like(h64),)
    return loss.detach(), grad, h.double().abs() @ w.double().abs().t()


def _ours(h, w, labels, dtype, chunk):
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, labels, dtype, chunk)
    if labels.ne(-100).any():
        loss.backward()
    return loss.detach(), hh.grad if hh.grad is not None else torch.zeros_like(h)


shapes = dict(
    n=st.integers(1, 40),
    v=st.integers(2, 300),
    k=st.integers(1, 48),
    ignored=st.sampled_from([0.0, 0.3, 1.0]),
    chunk=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_float32_is_torchs_cross_entropy_up_to_summation_order(n, v, k, ignored, chunk, seed):
    h, w, labels = _problem(n, v, k, ignored, seed)
    loss, grad = _ours(h, w, labels, torch.float32, chunk)
    ref_h = h.clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ w.t(), labels, ignore_index=-100)
    if not labels.ne(-100).any():  # every label ignored: NaN, as torch's mean
        assert math.isnan(float(loss)) and math.isnan(float(ref))
        return
    ref.backward()
    # both are float32: GEMMs of k terms and sums of v terms, in different orders
    tol = 4 * (k + v + n) * U32
    assert abs(float(loss) - float(ref)) <= tol * (1 + abs(float(ref)))
    scale = float(ref_h.grad.abs().max()) + 1.0 / n
    torch.testing.assert_close(grad, ref_h.grad, rtol=0, atol=tol * scale)


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_bfloat16_is_within_the_derived_bound_of_the_exact_loss(n, v, k, ignored, chunk, seed):
    """Each logit z = bf16(bf16(h) bf16(W)^T) (float32 accumulation) is within
    c_k (|h| |W|^T) of the exact z* (the bound of docs/training.md); so each row's loss,
    lse(z) - z_y, within 2 max_i |z_i - z*_i| =: 2 d; the gradient (p - onehot) / count @ W:
    p_i = p*_i exp(e_i), |e_i| <= 2 d, then the bfloat16 GEMM's own c_v (|G| |W|)."""
    h, w, labels = _problem(n, v, k, ignored, seed)
    loss, grad = _ours(h, w, labels, torch.bfloat16, chunk)
    exact, exact_grad, hw = _exact(h, w, labels)
    ok = labels.ne(-100)
    if not ok.any():
        assert math.isnan(float(loss))
        return

    def c(length: int) -> float:
        g = (length + 1) * U32 / (1 - (length + 1) * U32)
        u = BF16_U
        return 2 * u + u * u + (1 + u) ** 2 * (g + u * (1 + g))

    slack = 64 * v * U32  # the float32 softmax, sums and logs
    d = c(k) * hw.max(dim=1).values  # per row
    bound = float((2 * d[ok]).mean()) + slack * (1 + float(exact))
    assert abs(float(loss) - float(exact)) <= bound
    logits = h.double() @ w.double().t()
    p = torch.softmax(logits, dim=1)
    g_exact = p.clone()
    g_exact[ok, labels[ok]] -= 1
    g_exact = g_exact * ok.unsqueeze(1) / int(ok.sum())
    g_err = p * torch.expm1(2 * d.unsqueeze(1) + slack) / int(ok.sum())  # |p' - p| per entry
    w64 = w.double().abs()
    g_bound = g_err @ w64 + c(v) * ((g_exact.abs() + g_err) @ w64) + slack * (g_exact.abs() @ w64)
    assert torch.all((grad.double() - exact_grad).abs() <= g_bound + 1e-30)


def test_bad_input_is_named():
    h, w, labels = _problem(4, 10, 8, 0.0, 0)
    with pytest.raises(ValueError, match="freeze"):
        linear_cross_entropy(h, w.clone().requires_grad_(), labels)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, labels[:3])


def _tiny_qlora(train_dtype: torch.dtype, model_type: str | None = None, seed: int = 0):
    """A tiny Llama with a tied lm_head (as SmolLM2), its Linears in nf4 computing in
    `train_dtype`, LoRA on q/v with non-zero B (as after some training)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ferroquant.train.lora import apply_lora

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
    model = fq.quantize_model(LlamaForCausalLM(cfg), "nf4", progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.train_dtype = train_dtype
    if model_type is not None:
        model.config.model_type = model_type
    pm = apply_lora(model, r=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def _loss_and_grads(pm, fn, ids):
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    pm.train()
    loss = fn(ids)
    loss.backward()
    return float(loss), [p.grad.clone() for p in params]


def _ids(n: int = 3, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(1))


def test_a_qlora_model_gets_the_models_own_loss_and_lora_gradients():
    """float32 base layers and head: the fused path and the model's own loss agree to float32
    rounding, the loss and every LoRA gradient."""
    pm = _tiny_qlora(torch.float32)
    ids = _ids()
    assert fused_head(pm) is not None and base_compute_dtype(pm) == torch.float32
    ref_loss, ref_grads = _loss_and_grads(pm, lambda x: pm(input_ids=x, labels=x).loss, ids)
    loss, grads = _loss_and_grads(pm, lambda x: causal_lm_loss(pm, x), ids)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert len(grads) == 8 and all(float(g.abs().sum()) > 0 for g in grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


def test_bfloat16_base_layers_give_a_bfloat16_head_equal_to_that_unfused_head():
    """bfloat16 base layers: causal_lm_loss computes the head in bfloat16, which is the model's
    own loss with its lm_head computed as `F.linear(h.bf16(), W.bf16()).float()`, up to float32
    summation order in the loss (and a bfloat16 rounding of the hidden-state gradient that this
    can flip, which the layers below carry on)."""
    pm = _tiny_qlora(torch.bfloat16)
    assert base_compute_dtype(pm) == torch.bfloat16
    ids = _ids()
    head = pm.get_base_model().lm_head

    def bf16_head(x):
        orig = head.forward
        head.forward = lambda h: F.linear(h.bfloat16(), head.weight.bfloat16()).float()
        try:
            return pm(input_ids=x, labels=x).loss
        finally:
            head.forward = orig

    ref_loss, ref_grads = _loss_and_grads(pm, bf16_head, ids)
    f32_loss, _ = _loss_and_grads(pm, lambda x: causal_lm_loss(pm, x, torch.float32), ids)
    loss, grads = _loss_and_grads(pm, lambda x: causal_lm_loss(pm, x), ids)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert abs(loss - f32_loss) > 0  # the bfloat16 head did run
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g - r).norm()) <= 1e-2 * float(r.norm())


def test_where_the_fused_path_does_not_apply_the_models_own_loss_runs():
    ids = _ids(2, 16)
    other = _tiny_qlora(torch.float32, model_type="gemma2")  # logit soft-capping type
    assert fused_head(other) is None
    assert float(causal_lm_loss(other, ids)) == float(other(input_ids=ids, labels=ids).loss)
    pm = _tiny_qlora(torch.float32)
    pm.get_base_model().lm_head.weight.requires_grad_(True)  # a trainable (tied) head
    assert fused_head(pm) is None
    assert float(causal_lm_loss(pm, ids)) == float(pm(input_ids=ids, labels=ids).loss)


def test_the_trainer_takes_the_fused_loss_when_asked():
    from ferroquant.train.loop import TrainConfig, Trainer

    windows = _ids(4, 16)
    losses = []
    for fused in (False, True):
        cfg = TrainConfig(steps=1, batch=2, seq_len=16, fused_loss=fused)
        losses.append(Trainer(_tiny_qlora(torch.float32), windows, cfg).step()[0])
    assert abs(losses[0] - losses[1]) <= 1e-6 * losses[0]
