"""Quantization-aware training: `prepare(model, recipe_or_qtype)` swaps every nn.Linear for a
`FakeQuantLinear` whose forward sees the weights (and, where the CPU kernel quantizes them, the
activations) exactly as ferroquant will store and multiply them; `convert(model)` swaps them for
`QuantLinear`, whose outputs on the CPU kernel equal the fake-quant forward bit for bit.

Two forwards, the same rounding:
- "kernel" (the default on the CPU where the Rust core has a matmul kernel for the format): the
  current weights are quantized by the Rust reference and multiplied by the kernel itself, so the
  training loss is computed on exactly the outputs the converted model produces (for ggml
  formats: the blocks and activation rounding llama.cpp's CPU dot products use too).
- "torch" (CUDA, formats without a kernel, ternary; also under torch.compile, which runs it but
  may rewrite the rounding arithmetic: bit-identity is promised in eager mode only):
  `F.linear(fake_act(x), fake_w(W))` with both roundings done in torch (`fake_quant.py`,
  bit-identical values); only the float summation order differs from the kernel's.

Backward (both): the straight-through estimator. dL/dx = dL/dy · W_q (through the activation
rounding as if it were the identity), dL/dW = (dL/dy)ᵀ · x_q (kernel mode: x itself, see
`_FakeQuantMatmul`), zeroed where the format clipped the weight. Scales are recomputed from
the current weights on every forward.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _native
from ..models.recipes import Recipe, recipe_for
from ..nn import QuantLinear
from ..nn.ops import native_kernel_available
from ..tensor import QuantizeError, dequantize, quantize
from .fake_quant import (
    TERNARY,
    check_row_length,
    clip_mask,
    fake_quantize_activation,
    fake_quantize_weight,
    min_format_parts,
    nf4_kernel_weights,
    q8_1_sums,
)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
MODES = ("auto", "kernel", "torch")


def _kernel_forward(
    x2: torch.Tensor, w: torch.Tensor, qtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = x2 @ W_qᵀ by the Rust kernel, W_q): the current weights quantized by the Rust
    reference and multiplied by the kernel QuantLinear calls after `convert` (the same bytes,
    the same call); W_q = those bytes dequantized, for the backward."""
    qt = quantize(w.detach().to("cpu", torch.float32).contiguous(), qtype)
    n, k = qt.shape
    stats = np.ascontiguousarray(np.asarray(qt.stats, dtype=np.float32).reshape(-1))
    y = _native.qmatmul(x2.detach().to(torch.float32).contiguous().numpy(), qt.data.reshape(-1),
                        qtype, n, k, qt.block_size, stats, qt.scale_mode or None)  # fmt: skip
    wq = torch.from_numpy(np.ascontiguousarray(dequantize(qt)))
    return torch.from_numpy(np.asarray(y)), wq


class _FakeQuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, qtype: str, kernel: bool) -> Any:
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if kernel:
            # The activations' own rounding happens inside the kernel; the weight gradient uses
            # x itself (the q8 / 16-bit rounding is below 0.4 % of each block's largest value,
            # and redoing it in torch would cost more than the matmul).
            y, wq = _kernel_forward(x2, w, qtype)
            keep = clip_mask(w, qtype)
            xs = x2.detach().to(torch.float32)
        else:
            wq, keep = fake_quantize_weight(w, qtype)
            xs = fake_quantize_activation(x2, qtype)
            if qtype in ("q4_1", "q5_1"):
                # the kernel's `d·q + m` weights: the m term meets the activations' f16 sums
                qd, m = min_format_parts(w, qtype)
                y = F.linear(xs, qd) + q8_1_sums(x2) @ m.t()
            elif qtype == "nf4":
                y = F.linear(xs, nf4_kernel_weights(w))
            else:
                y = F.linear(xs, wq)
        ctx.save_for_backward(xs, wq, keep)
        ctx.in_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> Any:
        xs, wq, keep = ctx.saved_tensors
        g2 = gy.reshape(-1, wq.shape[0]).to(torch.float32)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ wq).to(ctx.in_dtype).reshape(*gy.shape[:-1], wq.shape[1])
        if ctx.needs_input_grad[1]:
            gw = ((g2.t() @ xs) * keep).to(ctx.w_dtype)
        return gx, gw, None, None


class _FakeQuantWeight(torch.autograd.Function):
    """W -> its fake-quantized values, gradient passed where the format did not clip (for the
    formats with neither a kernel nor an activation rounding: ternary)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, qtype: str) -> Any:
        wq, keep = fake_quantize_weight(w, qtype)
        ctx.save_for_backward(keep)
        return wq.to(w.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        (keep,) = ctx.saved_tensors
        return g * keep, None


class FakeQuantLinear(nn.Linear):
    """An nn.Linear trained with its quantization in the loop (same parameters, same state dict
    keys as the Linear it replaces)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        qtype: str = "q4_0",
        mode: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_row_length(qtype, in_features)
        self.qtype = qtype
        self.mode = mode

    @classmethod
    def from_linear(cls, lin: nn.Linear, qtype: str, mode: str = "auto") -> FakeQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameters: optimizers keep them
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        new.qtype, new.mode = qtype, mode
        return new

    def uses_kernel(self, x: torch.Tensor) -> bool:
        if self.mode == "torch" or self.qtype == TERNARY:
            return False
        ok = (
            x.device.type == "cpu"
            and native_kernel_available(self.qtype)
            and not torch.compiler.is_compiling()
        )
        if self.mode == "kernel" and not ok:
            raise QuantizeError(
                f"mode='kernel' needs a CPU tensor and a format with a CPU kernel ({self.qtype}, "
                f"{x.device}); use mode='torch'"
            )
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qtype == TERNARY:  # F.linear as the converted float Linear computes it
            return F.linear(x, _FakeQuantWeight.apply(self.weight, TERNARY), self.bias)
        y = _FakeQuantMatmul.apply(x, self.weight, self.qtype, self.uses_kernel(x))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}, mode={self.mode}"


def _count_layers(names: list[str]) -> int:
    idx = [int(m.group(1)) for n in names for m in [_LAYER_INDEX.search(n)] if m]
    return max(idx) + 1 if idx else 1


def plan(
    model: nn.Module, recipe_or_qtype: str | Recipe, skip: tuple[str, ...] = ("lm_head",)
) -> dict[str, str | None]:
    """{Linear name: qtype or None (kept float)} for `model`, checked before anything changes:
    a QuantizeError for a model without nn.Linear layers, an unknown qtype, or a layer whose row
    length the qtype cannot hold."""
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, FakeQuantLinear)
    ]
    if not linears:
        raise QuantizeError(f"{type(model).__name__} has no nn.Linear layers to train quantized")
    out: dict[str, str | None] = {}
    if isinstance(recipe_or_qtype, str) and recipe_or_qtype.lower() == TERNARY:
        for name, _ in linears:
            skipped = any(s == name or name.endswith("." + s) for s in skip)
            out[name] = None if skipped else TERNARY
        return out
    rule = recipe_or_qtype if isinstance(recipe_or_qtype, Recipe) else None
    pure = None
    if rule is None:
        rule = recipe_for(str(recipe_or_qtype), skip)
        pure = None if rule.is_mix else rule.base
    n_layer = _count_layers([n for n, _ in linears])
    for name, lin in linears:
        if pure is not None:  # a qtype asked for by name must fit every layer it applies to
            skipped = any(s == name or name.endswith("." + s) for s in rule.skip)
            if not skipped:
                check_row_length(pure, lin.in_features, name)
            out[name] = None if skipped else pure
        else:
            out[name] = rule.qtype_for(name, tuple(lin.weight.shape), n_layer)
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def prepare(
    model: nn.Module,
    recipe_or_qtype: str | Recipe = "q4_0",
    *,
    skip: tuple[str, ...] = ("lm_head",),
    mode: str = "auto",
) -> nn.Module:
    """Swap each nn.Linear of `model` (in place) for a FakeQuantLinear of the qtype the recipe
    gives it (a qtype name, a llama.cpp mix such as "q4_k_m", a Recipe, or "ternary"); modules
    named in `skip` stay float. Returns the model; `model.ferroquant_qat_plan` holds the plan."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = plan(model, recipe_or_qtype, skip)
    for name, q in p.items():
        if q is not None:
            _set(model, name, FakeQuantLinear.from_linear(model.get_submodule(name), q, mode))
    model.ferroquant_qat_plan = p
    return model


TERNARY_FORMATS = ("tq1_0", "tq2_0")


def convert(model: nn.Module, *, ternary_as: str | None = None) -> nn.Module:
    """Replace every FakeQuantLinear (in place) by the QuantLinear of its current weights (same
    Rust quantizer, so the same bytes the kernel forward used).

    Ternary layers: with `ternary_as=None` they stay float Linears holding their ternary values
    (gamma * {-1, 0, 1}), the exact training forward. With `ternary_as="tq1_0"|"tq2_0"` they are
    stored in ggml's ternary format (what llama.cpp runs): the {-1, 0, 1} pattern is kept exactly
    and gamma becomes each 256-block's f16 scale; rows that are not a multiple of 256 (ggml's
    block) go to q8_0, which also holds gamma * {-1, 0, 1} exactly up to the f16 rounding of
    gamma / 127. Their forward then rounds activations as those kernels do (q8_K / q8_0)."""
    if ternary_as is not None and ternary_as not in TERNARY_FORMATS:
        raise QuantizeError(
            f"ternary_as must be None or one of {TERNARY_FORMATS}, got {ternary_as!r}"
        )
    fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not fakes:
        raise QuantizeError("the model has no FakeQuantLinear layers: call qat.prepare first")
    for name, m in fakes:
        with torch.no_grad():
            if m.qtype == TERNARY:
                lin = nn.Linear(m.in_features, m.out_features, m.bias is not None)
                lin.weight.copy_(fake_quantize_weight(m.weight, TERNARY)[0])
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                new: nn.Module = lin.to(m.weight.device)
                if ternary_as is not None:
                    store = ternary_as if m.in_features % 256 == 0 else "q8_0"
                    lin = lin.to("cpu", torch.float32)
                    new = QuantLinear.from_linear(lin, store).to(m.weight.device)
            else:
                w = m.weight.detach().to("cpu", torch.float32).contiguous()
                plain = nn.Linear(m.in_features, m.out_features, m.bias is not None)
                plain.weight = nn.Parameter(w, requires_grad=False)
                if m.bias is not None:
                    plain.bias = nn.Parameter(m.bias.detach().to("cpu"), requires_grad=False)
                new = QuantLinear.from_linear(plain, m.qtype).to(m.weight.device)
        _set(model, name, new)
    return model
