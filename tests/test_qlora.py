"""QLoRA: QuantLinear's gradient with respect to its input equals grad_y @ dequantize(W) (float64
reference, float32 rounding bound) for every qtype, and its weight stays frozen; peft's LoRA on
QuantLinear; merge_lora; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ferroquant as fq
from ferroquant.nn import QuantLinear

ALL_QTYPES = [q.name for q in fq.qtypes()]
U32 = 2.0**-24  # float32 unit roundoff


def _quant_linear(qtype: str, n: int = 40, k: int = 256, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_linear(lin, qtype)


@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_grad_input_is_grad_y_times_dequantized_weight(qtype):
    ql = _quant_linear(qtype)
    n, k = ql.out_features, ql.in_features
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, k, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 3, n, generator=g)
    ql(x).backward(grad_y)
    w = fq.dequantize(ql.qtensor()).astype(np.float64)
    gy = grad_y.reshape(-1, n).double().numpy()
    exact = gy @ w
    # float32 dot products of length n, rounded once more on output: |err| <= gamma_{n+1} |g||W|
    gamma = (n + 1) * U32 / (1 - (n + 1) * U32)
    bound = gamma * (np.abs(gy) @ np.abs(w))
    got = x.grad.reshape(-1, k).double().numpy()
    err = np.abs(got - exact)
    assert (err <= bound).all(), f"{qtype}: max error {err.max():.3g} over bound"
    assert np.abs(exact).max() > 0  # the check is not vacuous
    # the weight is frozen: bytes and statistics are buffers, the bias takes no gradient
    assert all(not p.requires_grad for p in ql.parameters())
    assert not ql.qweight.requires_grad and ql.qweight.grad is None
