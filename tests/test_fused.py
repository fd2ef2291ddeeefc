"""Fused sibling QuantLinears (ferroquant.nn.fused): the same bits as each member alone, the
members' own tensors in checkpoints, and every way a group stops matching its members."""

from __future__ import annotations

import copy
import io
import pickle

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import ferroquant.nn.linear as linear_mod
from ferroquant import QuantizeError
from ferroquant.models import quantize_model
from ferroquant.nn import QuantLinear, fuse_linears

QTYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "iq4_nl", "nf4", "int8", "fp8_e4m3", "int4_g64"]


class Block(nn.Module):
    """An attention's q/k/v and an MLP's gate/up reading one input, as in Llama."""

    def __init__(self, k: int = 128, bias: bool = False) -> None:
        super().__init__()
        self.q_proj = nn.Linear(k, k, bias=bias)
        self.k_proj = nn.Linear(k, 32, bias=bias)
        self.v_proj = nn.Linear(k, 48, bias=False)
        self.gate_proj = nn.Linear(k, 96, bias=False)
        self.up_proj = nn.Linear(k, 96, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x),
                self.up_proj(x))  # fmt: skip


def quantized(qtype: str, bias: bool = False, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return quantize_model(Block(bias=bias), qtype, skip=(), progress=False, **options)


def alone(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    linear_mod._FUSED = False
    try:
        return model(x)
    finally:
        linear_mod._FUSED = True


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_outputs_are_each_members_bits(qtype: str, bias: bool) -> None:
    model = quantized(qtype, bias=bias)
    assert model.q_proj.__dict__.get("_fused") is not None  # quantize_model fused them
    assert model.gate_proj.__dict__.get("_fused") is not None
    with torch.inference_mode():
        for m in (1, 3, 16, 130):
            x = torch.randn(2, m, 128).to(torch.bfloat16)
            got = model(x)
            assert same(got, alone(model, x)), (qtype, m)
            assert all(t.is_contiguous() for t in got)
            assert [t.shape[-1] for t in got] == [128, 32, 48, 96, 96]


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 40), qtype=st.sampled_from(["q8_0", "nf4", "int8", "q4_1"]))
def test_fused_matches_alone_for_any_rows(m: int, qtype: str) -> None:
    model = quantized(qtype, seed=m)
    x = torch.randn(m, 128).to(torch.bfloat16)
    with torch.no_grad():
        assert same(model(x), alone(model, x))


def test_waiting_outputs_belong_to_their_input() -> None:
    model = quantized("q8_0")
    x, y = (torch.randn(5, 128).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        want_x, want_y = alone(model, x), alone(model, y)
        assert torch.equal(model.q_proj(x), want_x[0])
        # another input before the siblings: computed for it, not taken from x's call
        assert torch.equal(model.k_proj(y), want_y[1])
        assert torch.equal(model.v_proj(x), want_x[2])
        # a member called twice with the same input: the second call runs again
        assert torch.equal(model.k_proj(x), want_x[1])
        assert torch.equal(model.k_proj(x), want_x[1])
        # the input changed in place between the siblings (a tensor with a version counter)
        model.q_proj.__dict__["_fused"][0].dropped = 0  # (the calls above dropped some)
        model.q_proj(x)
        x.mul_(2)
        assert torch.equal(model.k_proj(x), alone(model, x)[1])


def test_members_reading_different_inputs_stop_fusing() -> None:
    from ferroquant.nn.fused import MAX_DROPPED

    model = quantized("q8_0")
    group = model.q_proj.__dict__["_fused"][0]
    with torch.no_grad():
        for _ in range(3):  # a cross-attention: q on one input, k / v on another
            x, y = (torch.randn(4, 128).to(torch.bfloat16) for _ in range(2))
            want = alone(model, x)[0], alone(model, y)[1], alone(model, y)[2]
            got = model.q_proj(x), model.k_proj(y), model.v_proj(y)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert group.dropped >= MAX_DROPPED
    assert group.call(0, x) is None  # no longer fused


def test_other_dtypes_and_autograd_run_alone() -> None:
    model = quantized("nf4")
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert same(model(x), alone(model, x))
    xg = torch.randn(4, 128, requires_grad=True)
    model(xg)[1].sum().backward()
    assert xg.grad is not None


def test_checkpoints_hold_each_members_own_tensors() -> None:
    model = quantized("q4_0", bias=True)
    sd = model.state_dict()
    assert sd["k_proj.qweight"]._base is None
    assert sd["k_proj.qweight"].numel() == model.k_proj.qweight.numel()
    buf = io.BytesIO()
    torch.save(sd, buf)
    fresh = quantized("q4_0", bias=True, seed=1, fuse=False)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(7, 128).to(torch.bfloat16)
    with torch.no_grad():
        assert same(fresh(x), model(x))


def test_a_group_that_no_longer_matches_runs_alone() -> None:
    model = quantized("q8_0")
    other = quantized("q8_0", seed=3, fuse=False)
    x = torch.randn(9, 128).to(torch.bfloat16)
    model.load_state_dict(other.state_dict())  # replaces the members' buffers
    with torch.no_grad():
        assert same(model(x), other(x))
    assert model.q_proj.__dict__["_fused"][0].intact() is False
    assert fuse_linears(model) == 2  # fused again
    with torch.no_grad():
        assert same(model(x), other(x))


def test_in_place_changes_of_a_member_reach_its_group() -> None:
    model, other = quantized("int8"), quantized("int8", seed=5, fuse=False)
    with torch.no_grad():
        model.k_proj.qweight.copy_(other.k_proj.qweight)
        model.k_proj.qstats.copy_(other.k_proj.qstats)
        x = torch.randn(3, 128).to(torch.bfloat16)
        assert torch.equal(model(x)[1], other.k_proj(x))


def test_copies_run_unfused_with_the_same_bits() -> None:
    model = quantized("nf4")
    x = torch.randn(6, 128).to(torch.bfloat16)
    for c in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert c.q_proj.__dict__.get("_fused") is None
        with torch.no_grad():
            assert same(c(x), model(x))


def test_what_is_not_fused() -> None:
    assert quantized("q8_0", fuse=False).q_proj.__dict__.get("_fused") is None
    # one scale for a whole tensor does not stack
    m = quantized("int8", scale_mode="tensor")
    assert m.q_proj.__dict__.get("_fused") is None
    # members of different formats
    torch.manual_seed(0)
    b = Block()
    b.q_proj = QuantLinear.from_linear(b.q_proj, "q8_0")
    b.k_proj = QuantLinear.from_linear(b.k_proj, "q4_0")
    b.v_proj = QuantLinear.from_linear(b.v_proj, "q8_0")
    assert fuse_linears(b) == 0
    # a group with a member missing
    b = quantized("q8_0", fuse=False)
    del b.v_proj
    assert fuse_linears(b) == 1  # gate/up only


def test_split_binding_checks_its_parts() -> None:
    import numpy as np

    from ferroquant import _native

    model = quantized("q8_0", fuse=False)
    q = model.q_proj
    x = np.zeros((2, 128), dtype=np.uint16)
    w, s = q._eager_weights()
    with pytest.raises(QuantizeError):
        _native.qmatmul_bf16_split(x, w, "q8_0", [64, 63], 128, 32, s)
    with pytest.raises(QuantizeError):
        _native.qmatmul_bf16_split(x, w, "q8_0", [64, 65], 128, 32, s)
    ys = _native.qmatmul_bf16_split(x, w, "q8_0", [100, 28], 128, 32, s)
    assert [y.shape for y in ys] == [(2, 100), (2, 28)]
