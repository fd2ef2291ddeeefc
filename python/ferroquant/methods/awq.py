"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization"), into any format.

For a group of Linears fed by one input x (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, down after up, o after v when their shapes allow), a per-input-channel
scale s is searched on a grid of `grid` ratios a = 0, 1/grid, ..., (grid-1)/grid, as AutoAWQ and
llm-compressor compute it:

    x_mean = mean over tokens of |x| per channel
    w_mean = mean over rows of |W| / max|W| of its group (groups of the format's block, the
             Linears' weights stacked)
    s = clamp(x_mean^a / (w_mean^(1-a) + 1e-4), min=1e-4)     (duo_scaling; else x_mean^a)
    s = s / sqrt(max(s) * min(s))

and the loss of a candidate is the MSE of the block output: the module fed by x (the attention
module for q/k/v, the MLP for gate/up, o_proj / down_proj alone for the others) run with each
Linear's weight replaced by Q(W diag(s)) diag(s)^-1, Q the target format's own quantizer
(`ferroquant.quantize` then `dequantize`), against the float block's output. s = 1 (plain RTN)
is always a candidate, so the chosen scale's loss is never above RTN's (with duo_scaling, a = 0
is s = 1/w_mean, not 1). The best s is folded: the Linears' columns times s, the previous op
(the norm's weight, or the previous Linear's rows and bias) divided by s, so the float model
computes the same function. Then the clip search (AutoAWQ's): per row and group, the weight is
clamped to max|w| * (1 - i/clip_grid) for i < clip_grid * max_shrink, each candidate quantized
by the format, and the shrink with the least MSE of that group's partial output on
`clip_tokens` tokens kept (q and k are not clipped: their errors pass through the softmax, as
AutoAWQ avoids them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _native
from ..qtypes import gint_params, qtype_info
from ..tensor import QuantizeError, dequantize, quantize


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's options (defaults: AutoAWQ's, but float_inputs and clip_tokens: per method).

    grid: scale ratios searched (20). duo_scaling: s = x_mean^a / w_mean^(1-a) (True) or
      x_mean^a (False). clip: run the clip search after scaling. clip_grid, max_shrink: clip
      candidates max|w| * (1 - i/clip_grid), i < clip_grid * max_shrink (20, 0.5).
    clip_tokens: tokens the clip search uses, evenly strided over the calibration set (512:
      AutoAWQ's); 0: every calibration token, through the capture's x^T x of the Linear's
      inputs (its diagonal blocks are the clip search's per-group grams: no rows to collect).
      None (the default): 0 for "awq", 512 for "awq+gptq" (`resolved`).
      On SmolLM2 int4_g64 (8 x 512), awq with float inputs and every token: ppl 36.436 / KL
      0.1446 against 36.831 / 0.1486 with 512 tokens and the sequential inputs; awq+gptq
      the other way round, 36.426 / 0.1372 against 36.742 / 0.1391 (docs/methods.md).
    identity: s = 1 (plain RTN) is a candidate besides the grid (True; AutoAWQ, GPTQModel and
      llm-compressor search the grid only: False).
    gqa_vo: search v_proj -> o_proj under grouped-query attention too (False: skipped there,
      as AutoAWQ, GPTQModel and llm-compressor skip it): o's input channels of the heads that
      share a key/value head take that head's v channel's scale (`HeadTie`), the statistics
      averaged over those heads.
    n_samples, seq_len: calibration windows (128 x 512, AutoAWQ uses 128 x 512 of pile-val).
    screen_stride, screen_keep: the block-forward searches screen every candidate on every
      screen_stride-th window, then score the screen_keep best and s = 1 on all windows
      (`awq_layers.block_losses`; screen_stride 1: every candidate on every window, AutoAWQ's).
      On SmolLM2 int4_g64's 60 block searches the full search's best was the screen's best
      or second (stride 4): keep 3 picks what the full search picks there, with a rank to spare.
      None (the default): 8 for "awq", 4 for "awq+gptq" (`resolved`).
    screen_keep_attention: screen_keep of the attention blocks' searches (their losses pass
      the softmax: the screen ranks them less reliably). None (the default): screen_keep + 2
      for "awq", screen_keep for "awq+gptq". On SmolLM2 int4_g64 (8 x 512, awq's float inputs,
      every candidate's per-window losses, `AWQConfig`'s picks simulated): stride 8 with keep
      3 for the MLP and 5 for the attention picks what stride 4 keep 3 picks in 60 of 60
      searches (keep 3 for both: 59, one attention pick worse), at 0.86x the block forwards.
    float_inputs: the next decoder layer's inputs are this layer's FLOAT outputs (computed
      with its weights before scaling, clipping and quantization: AutoAWQ's pipeline, in which
      every layer sees the float model's activations) instead of the quantized layer's
      (False: the sequential capture, GPTQ's and GPTQModel's AWQ's). None (the default): True
      for "awq", False for "awq+gptq" (`resolved`).
    gptq: after scaling and clipping, quantize with GPTQ ("awq+gptq") instead of RTN, with
      `gptq_damp` and `gptq_act_order` (GPTQConfig's damp and act_order).
    """

    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int | None = None
    identity: bool = True
    gqa_vo: bool = False
    n_samples: int = 128
    seq_len: int = 512
    screen_stride: int | None = None
    screen_keep: int = 3
    screen_keep_attention: int | None = None
    float_inputs: bool | None = None
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = True

    def resolved(self) -> AWQConfig:
        """This config with its method-dependent defaults (None) filled in: float_inputs and
        every clip token for "awq", the sequential inputs and 512 clip tokens for "awq+gptq"
        (each measured the better pair for its method, `clip_tokens`); "awq"'s screen every
        8th window keeping 5 attention finalists, "awq+gptq"'s every 4th keeping screen_keep
        (`screen_keep_attention`: awq's picks are stride 4's; awq+gptq's were not checked)."""
        keep_attention = self.screen_keep_attention
        if keep_attention is None:
            keep_attention = self.screen_keep + (0 if self.gptq else 2)
        return replace(
            self,
            float_inputs=(not self.gptq) if self.float_inputs is None else self.float_inputs,
            clip_tokens=(512 if self.gptq else 0) if self.clip_tokens is None else self.clip_tokens,
            screen_stride=(4 if self.gptq else 8) if self.screen_stride is None else (
                self.screen_stride),
            screen_keep_attention=keep_attention,
        )  # fmt: skip

    def describe(self) -> str:
        name = "awq+gptq" if self.gptq else "awq"
        done = self.resolved()
        items = {k: v for k, v in asdict(done).items() if self.gptq or not k.startswith("gptq")}
        return f"{name}(" + ", ".join(f"{k}={v}" for k, v in items.items()) + ")"


Quantizer = Callable[[torch.Tensor], torch.Tensor]


def format_qdq(qtype: str | None, options: dict[str, Any] | None = None) -> Quantizer:
    """W -> dequantize(quantize(W, qtype)) as float32 (None: the identity, a kept Linear). The
    grouped integers with integer zeros (int4_g64, ...) take the Rust core's fused
    `_native.gint_qdq`: the same values without the bytes between, a fifth of the work (the
    searches quantize every candidate)."""
    if qtype is None:
        return lambda w: w
    opts = options or {}
    if gint_params(qtype) is not None and not any(v is not None for v in opts.values()):
        return GIntQdq(qtype)

    def qdq(w: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(w.detach().to(torch.float32).numpy())
        out = np.asarray(dequantize(quantize(arr, qtype, **opts)), dtype=np.float32)
        return torch.from_numpy(out.reshape(arr.shape).copy())

    return qdq


def _f32_array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


class GIntQdq:
    """`format_qdq` of a grouped integer format with integer zeros: the Rust core's fused
    `_native.gint_qdq` (the round trip's values without the bytes between)."""

    def __init__(self, qtype: str) -> None:
        self.qtype = qtype

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_native.gint_qdq(_f32_array(w), self.qtype))

    def scaled(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """qdq(w * s) / s (s per column, finite and positive), the same bits as those two
        float32 products around the call, in one native call (AWQ's candidate weights)."""
        return torch.from_numpy(_native.gint_qdq(_f32_array(w), self.qtype, _f32_array(s)))


def scaled_qdq(qdq: Quantizer, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """qdq(w * s) / s in float32 (s per input column): fused where `qdq` is a `GIntQdq`."""
    if isinstance(qdq, GIntQdq):
        return qdq.scaled(w, s)
    return qdq(w * s) / s


def group_size(qtype: str | None, cols: int) -> int:
    """The format's block when it divides a row, else the whole row."""
    if qtype is None:
        return cols
    try:
        block = qtype_info(qtype).block_size
    except Exception:  # a format without a block table entry: per row
        return cols
    return block if block and cols % block == 0 else cols


def scale_candidates(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor,
    grid: int,
    duo_scaling: bool,
    identity: bool = True,
) -> list[tuple[float | None, torch.Tensor]]:
    """[(ratio, s)]: s = 1 first (ratio None; not with `identity=False`), then AutoAWQ's
    grid."""
    out: list[tuple[float | None, torch.Tensor]] = []
    if identity:
        out.append((None, torch.ones_like(x_mean)))
    for k in range(grid):
        a = k / grid
        if duo_scaling:
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        out.append((a, s))
    return out


def weight_mean(weights: list[torch.Tensor], group: int) -> torch.Tensor:
    """AutoAWQ's w_mean: |W| / max|W| per group, averaged over the stacked rows."""
    w = torch.cat([x.detach().to(torch.float32) for x in weights])
    rows, cols = w.shape
    g = w.abs().reshape(-1, group)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(rows, cols).mean(0)


@dataclass
class ScaleResult:
    """The chosen scale, its ratio (None: s = 1) and every candidate's loss (s = 1 first)."""

    scale: torch.Tensor
    ratio: float | None
    losses: list[float]


def search_scale(
    x_mean: torch.Tensor,
    linears: list[nn.Linear],
    qdqs: list[Quantizer],
    block: Callable[[], list[torch.Tensor]],
    reference: list[torch.Tensor],
    *,
    group: int,
    grid: int = 20,
    duo_scaling: bool = True,
) -> ScaleResult:
    """The scale of `linears`' input channels with the least block-output MSE: for each
    candidate s every Linear's weight is set to qdq(W s) / s, `block()` recomputes the block's
    outputs, compared with `reference` (the float outputs). The weights are restored."""
    originals = [lin.weight.data.clone() for lin in linears]
    w_mean = weight_mean(originals, group)
    cands = scale_candidates(x_mean.to(torch.float32), w_mean, grid, duo_scaling)
    losses = []
    try:
        for weights in candidate_weights(cands, originals, qdqs):
            for lin, w in zip(linears, weights, strict=True):
                lin.weight.data = w
            outs = block()
            num = sum(
                float((o - r).pow(2).sum(dtype=torch.float64))
                for o, r in zip(outs, reference, strict=True)
            )
            den = sum(r.numel() for r in reference)
            losses.append(num / max(den, 1))
    finally:
        for lin, w0 in zip(linears, originals, strict=True):
            lin.weight.data = w0
    return pick_scale(cands, losses)


def candidate_weights(
    cands: list[tuple[float | None, torch.Tensor]],
    originals: list[torch.Tensor],
    qdqs: list[Quantizer],
) -> list[list[torch.Tensor]]:
    """For each candidate s, each Linear's weight as the search evaluates it: qdq(W s) / s."""
    return [[scaled_qdq(qdq, w0, s) for w0, qdq in zip(originals, qdqs, strict=True)]
            for _, s in cands]  # fmt: skip


def pick_scale(cands: list[tuple[float | None, torch.Tensor]], losses: list[float]) -> ScaleResult:
    """The candidate with the least loss; ties keep the earlier (s = 1 first)."""
    best: tuple[float, float | None, torch.Tensor] | None = None
    for (ratio, s), loss in zip(cands, losses, strict=True):
        if best is None or loss < best[0]:
            best = (loss, ratio, s)
    assert best is not None
    return ScaleResult(best[2], best[1], list(losses))


@dataclass(frozen=True)
class HeadTie:
    """v_proj -> o_proj under grouped-query attention: o's input channel (head h, dim d) reads
    v's output channel (h // rep, d) (transformers' `repeat_kv`), so a v channel's scale is
    that of its `rep` o channels. Vectors over o's inputs are [kv_heads * rep * head_dim]."""

    kv_heads: int
    rep: int
    head_dim: int

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """An o-side statistic averaged over the heads sharing a key/value head: v's side."""
        return v.reshape(self.kv_heads, self.rep, self.head_dim).mean(1).reshape(-1)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """v's scales [kv_heads * head_dim] as o's input scales."""
        h = s.reshape(self.kv_heads, 1, self.head_dim)
        return h.expand(self.kv_heads, self.rep, self.head_dim).reshape(-1)

    def first(self, s: torch.Tensor) -> torch.Tensor:
        """The v-side scales of expanded o-side scales (their first head's copy)."""
        return s.reshape(self.kv_heads, self.rep, self.head_dim)[:, 0].reshape(-1)


def fold_scale(
    prev: nn.Module,
    linears: list[nn.Linear],
    s: torch.Tensor,
    prev_scale: torch.Tensor | None = None,
) -> None:
    """Fold s into the float model without changing its function: the Linears' input columns
    times s, the previous op's output channels divided by s (a norm's weight, or a Linear's
    rows and bias), or by `prev_scale` where they differ (`HeadTie`: v's rows by the scales
    whose expansion is s)."""
    s = s.detach()
    sp = s if prev_scale is None else prev_scale.detach()

    def f(t: torch.Tensor) -> torch.Tensor:  # at least float32 inside (float64 stays float64)
        return t.to(torch.promote_types(t.dtype, torch.float32))

    if isinstance(prev, nn.Linear):
        if prev.out_features != sp.numel():
            raise QuantizeError(f"awq: cannot fold {sp.numel()} scales into a Linear of "
                                f"{prev.out_features} outputs")  # fmt: skip
        w = prev.weight.data
        prev.weight.data = (f(w) / f(sp)[:, None]).to(w.dtype)
        if prev.bias is not None:
            prev.bias.data = (f(prev.bias.data) / f(sp)).to(prev.bias.dtype)
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != sp.shape:
            raise QuantizeError(f"awq: cannot fold scales into {type(prev).__name__} "
                                "(needs a per-channel weight)")  # fmt: skip
        if "gemma" in type(prev).__name__.lower():  # Gemma's norm multiplies by (1 + weight)
            weight.data = ((1 + f(weight.data)) / f(sp) - 1).to(weight.dtype)
        else:
            weight.data = (f(weight.data) / f(sp)).to(weight.dtype)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = (f(bias.data) / f(sp)).to(bias.dtype)
    for lin in linears:
        w = lin.weight.data
        lin.weight.data = (f(w) * f(s)[None, :]).to(w.dtype)


def group_grams(x: torch.Tensor, group: int) -> torch.Tensor:
    """Per group of `group` input columns, X_g^T X_g / n of the inputs x [n, cols]: [groups,
    group, group] (float32)."""
    xg = x.detach().to(torch.float32).reshape(x.shape[0], -1, group).transpose(0, 1)  # [g, n, k]
    return torch.bmm(xg.transpose(1, 2), xg) / max(x.shape[0], 1)


def hessian_grams(sums: torch.Tensor, count: int, group: int) -> torch.Tensor:
    """The diagonal blocks of the inputs' mean x^T x (`sums` the [cols, cols] sum over `count`
    tokens): `group_grams` of every token at once, [groups, group, group] float32."""
    cols = sums.shape[0]
    ng = cols // group
    idx = torch.arange(ng)
    blocks = sums.reshape(ng, group, ng, group)[idx, :, idx, :]  # [g, k, k]
    return (blocks / max(count, 1)).to(torch.float32)


def group_output_mse(d: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """mean over the tokens of (d_rg . x_g)^2 for a weight error d [rows, groups, group]: the
    quadratic form d_rg G_g d_rg^T on `group_grams` (rows x group^2 per group instead of rows x
    tokens x group)."""
    t = torch.bmm(d.transpose(0, 1), grams)  # [g, rows, k]
    return (t * d.transpose(0, 1)).sum(-1).transpose(0, 1)  # [rows, g]


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor | None,
    qdq: Quantizer,
    group: int,
    *,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    grams: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's clip search: (per row and group max|w| to clamp to [rows, groups], the
    per-(row, group) output MSE of the chosen clip [rows, groups]). A candidate's error is the
    mean over the tokens x of that group's squared partial-output error, computed as the
    quadratic form of the weight error on the group's x^T x / n (`group_output_mse`: the same
    number as AutoAWQ's per-token products, group / tokens of their work: an eighth at 512
    tokens and group 64). Shrink 0 (no clipping) is the first candidate and ties keep it, so
    the error is never above RTN's (for formats whose blocks are the groups). `grams` [groups,
    group, group] instead of `x`: the inputs' per-group mean x^T x, given (`hessian_grams`)."""
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    ng = cols // group
    if grams is None:
        if x is None:
            raise QuantizeError("awq: the clip search needs its inputs x or their grams")
        grams = group_grams(x, group)
    wg = w.reshape(rows, ng, group)
    org_max = wg.abs().amax(dim=-1)  # [rows, g]
    best_err = torch.full_like(org_max, math.inf)
    best_max = org_max.clone()
    for i in range(max(1, int(max_shrink * clip_grid))):
        mx = (org_max * (1 - i / clip_grid))[..., None]
        cur = torch.maximum(torch.minimum(wg, mx), -mx).reshape(rows, cols)
        q = qdq(cur).reshape(rows, ng, group)
        err = group_output_mse(q - wg, grams)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, mx[..., 0], best_max)
    return best_max, best_err


def apply_clip(lin: nn.Linear, max_val: torch.Tensor) -> None:
    w = lin.weight.data
    rows, cols = w.shape
    ng = max_val.shape[1]
    mx = max_val[..., None].to(torch.float32)
    wg = w.to(torch.float32).reshape(rows, ng, cols // ng)
    lin.weight.data = torch.maximum(torch.minimum(wg, mx), -mx).reshape(rows, cols).to(w.dtype)
