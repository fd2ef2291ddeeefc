"""QuantLinear's eager path (the direct Rust call that skips the torch.library dispatcher) gives
the custom op's results bit for bit, and steps aside wherever the op is needed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ferroquant as fq  # noqa: E402
from ferroquant.nn import QuantLinear, ops  # noqa: E402

NATIVE = sorted(ops._NATIVE_QTYPES)


def _op(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward as it was: always through the custom op."""
    y = torch.ops.ferroquant.qmatmul(x, q.qweight, q.qstats, q.qtype, q.out_features,
                                     q.in_features, q.block_size, q.scale_mode or "")  # fmt: skip
    return y if q.bias is None else y + q.bias.to(y.dtype)


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = QuantLinear._eager_forward

    def spy(self, x, w, s):
        calls.append(1)
        return real(self, x, w, s)

    monkeypatch.setattr(QuantLinear, "_eager_forward", spy)
    return calls


@pytest.mark.parametrize("qtype", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_path_is_the_op_bit_for_bit(qtype, dtype, monkeypatch):
    torch.manual_seed(1)
    lin = nn.Linear(512, 24, bias=True)
    q = QuantLinear.from_linear(lin, qtype)
    calls = _spy(monkeypatch)
    for shape in ((1, 512), (3, 512), (2, 3, 512), (512,)):
        x = torch.randn(*shape).to(dtype)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 24)
        assert torch.equal(y, _op(q, x)), shape
    xt = torch.randn(512, 4).T  # not contiguous
    assert torch.equal(q(xt), _op(q, xt))
    assert len(calls) == 5  # each call above took the eager path


@pytest.mark.parametrize("openmp", ["off", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casts_in_pieces_are_the_op_bit_for_bit(dtype, openmp, monkeypatch):
    """Inputs and outputs longer than `_SERIAL_PIECE` are cast (and the bias added) in pieces on
    the calling thread when the kernel runs on the Rust pool (FERROQUANT_OPENMP=off), in one
    torch op each on torch's team: the same bits as the op's whole-tensor casts either way
    (bf16: cast inside the Rust call, the bias still in pieces)."""
    from ferroquant.nn import linear
    from ferroquant.nn.openmp import torch_team

    monkeypatch.setenv("FERROQUANT_OPENMP", openmp)
    pieces = _piece_copies(monkeypatch)
    torch.manual_seed(2)
    q = QuantLinear.from_linear(nn.Linear(256, 520, bias=True), "q8_0")
    calls = _spy(monkeypatch)
    for shape in ((70, 256), (3, 30, 256)):
        x = torch.randn(*shape).to(dtype)
        assert x.numel() > linear._SERIAL_PIECE and 70 * 520 > 2 * linear._SERIAL_PIECE
        with torch.no_grad():
            y = q(x)
        assert y.dtype == dtype and torch.equal(y, _op(q, x)), shape
    xt = torch.randn(256, 90).T.to(dtype)  # not contiguous
    with torch.no_grad():
        assert torch.equal(q(xt), _op(q, xt))
    assert len(calls) == 3
    if dtype == torch.bfloat16:
        # bf16 is cast inside the Rust call (`_native.qmatmul_bf16`): no torch cast at all
        assert pieces == [], (openmp, pieces)
        return
    # which way the casts went: pieces exactly when the kernel is off torch's team
    assert (sum(pieces) > 0) == (not torch_team()), (openmp, pieces)
    if openmp == "off":
        assert sum(pieces) > 0


def _piece_copies(monkeypatch) -> list[int]:
    """Counts `_serial_cast` calls that cut their tensor into pieces."""
    from ferroquant.nn import linear

    calls: list[int] = []
    real = linear._serial_cast

    def spy(t, dtype):
        calls.append(int(t.numel() > linear._SERIAL_PIECE))
        return real(t, dtype)

    monkeypatch.setattr(linear, "_serial_cast", spy)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_call_shapes_and_grad_flags_are_the_op(bias, monkeypatch):
    """The bf16 call's own handling of x (a uint16 view reshaped by numpy, detached where it
    requires grad under no_grad, made contiguous) and of the output (reshaped before torch
    sees it where there is no bias): the op's bits and shapes."""
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(256, 40, bias=bias), "q4_0")
    calls = _spy(monkeypatch)
    xs = [
        torch.randn(*s).to(torch.bfloat16) for s in ((5, 256), (2, 3, 256), (256,), (1, 1, 2, 256))
    ]
    xs.append(torch.randn(256, 6).T.to(torch.bfloat16))  # not contiguous
    xs.append(torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True))
    with torch.no_grad():
        for x in xs:
            y = q(x)
            assert y.dtype == torch.bfloat16 and y.shape == (*x.shape[:-1], 40)
            assert y.is_contiguous() and torch.equal(y, _op(q, x)), x.shape
    assert len(calls) == len(xs)


def test_the_op_path_runs_where_the_eager_path_must_not(monkeypatch):
    q = QuantLinear.from_linear(nn.Linear(64, 8), "q8_0")
    calls = _spy(monkeypatch)
    x = torch.randn(2, 64, requires_grad=True)
    q(x)  # autograd would record the op
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    x0 = torch.randn(2, 64)
    assert torch.equal(compiled(x0), _op(q, x0))
    assert torch.equal(q(torch.randn(0, 64)), _op(q, torch.randn(0, 64)))
    # a format without a CPU kernel: the op's reference path
    other = next(q for q in ("fp4", "f16", "bf16", "q5_1") if not ops.native_kernel_available(q))
    qo = QuantLinear.from_linear(nn.Linear(64, 8), other)
    assert torch.equal(qo(x0), _op(qo, x0))
    assert not calls
    with torch.no_grad():
        q(x)
    assert calls == [1]


def test_cached_weight_views_follow_the_buffers():
    torch.manual_seed(2)
    a = QuantLinear.from_linear(nn.Linear(64, 8, bias=False), "q8_0")
    b = QuantLinear.from_linear(nn.Linear(64, 8, bias=False), "q8_0")
    x = torch.randn(3, 64)
    ya, yb = a(x), b(x)
    assert not torch.equal(ya, yb)
    a.qweight.copy_(b.qweight)  # in place: the version counter moves
    assert torch.equal(a(x), yb)
    a.load_state_dict(QuantLinear.from_linear(nn.Linear(64, 8, bias=False), "q4_0").state_dict())
    assert a.qtype == "q4_0" and torch.equal(a(x), _op(a, x))
    a.qweight = b.qweight.clone()  # replaced
    a.qtype = "q8_0"
    assert torch.equal(a(x), yb)


def test_a_dtype_cast_keeps_the_statistics_float32():
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(128, 16), "nf4")
    stats = q.qstats.clone()
    x = torch.randn(2, 128)
    want = q(x)
    q.to(torch.bfloat16)
    assert q.qstats.dtype == torch.float32 and torch.equal(q.qstats, stats)
    assert q.bias.dtype == torch.bfloat16
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    # bf16 output of the same float32 product (bias added in bf16, as the op path does)
    assert torch.equal(y, _op(q, x.bfloat16()))
    assert (y.float() - want).abs().max() <= 2**-7 * want.abs().max() + 0.02


def test_thread_count_does_not_change_the_eager_result():
    q = QuantLinear.from_linear(nn.Linear(256, 64), "q4_k")
    x = torch.randn(5, 256)
    fq.set_num_threads(1)
    one = q(x)
    fq.set_num_threads(2)
    assert torch.equal(q(x), one)


@pytest.mark.parametrize("qtype", NATIVE)
def test_bf16_activations_in_the_rust_call_are_the_op_bit_for_bit(qtype, monkeypatch):
    """bf16 input takes `_native.qmatmul_bf16` (the casts inside the Rust call): the op's bits
    (f32 product, torch's rounding to bf16) at every path's M (row kernels, tiles, GEMMs, the
    bf16 GEMM from 12 rows, AMX from 32 / 128), with N off whole panels of 16, and the same as
    the f32 call between two torch casts (`linear._BF16_IO` off)."""
    from ferroquant.nn import linear

    assert linear._BF16_IO
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(512, 40, bias=False), qtype)
    for m in (5, 12, 16, 33, 128, 130):
        x = (torch.randn(m, 512) * 3).to(torch.bfloat16)
        with torch.no_grad():
            y = q(x)
            monkeypatch.setattr(linear, "_BF16_IO", False)
            y_f32 = q(x)
            monkeypatch.setattr(linear, "_BF16_IO", True)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 40)
        assert torch.equal(y.view(torch.int16), _op(q, x).view(torch.int16)), m
        assert torch.equal(y.view(torch.int16), y_f32.view(torch.int16)), m
