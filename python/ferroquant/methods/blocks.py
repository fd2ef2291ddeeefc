"""Block parameters as a calibrated method holds them (`Blocks`), and the grouped integers'
parameters computed per group (`GroupBlocks`, `group_params`).

`Blocks`' torch fields are per weight ([rows, n * block]), so that a column loop reads a
column's parameters without knowing the format's block. The grouped integers' fields are
constant over a group: `group_params` computes them once per group (the format's own rule,
`formats/gint.rs`, bit for bit) and `GroupBlocks` widens them to per-weight tensors only when
read, so the compiled column loop, which reads one column per group
(`FormatGrid.param_columns`), never pays for the [rows, cols] copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_GROUP_FIELDS = ("scale", "zero", "rscale")
F16_MAX = 65504.0  # the grouped integers' input range (`quantize.rs`: check_range)


@dataclass
class Blocks:
    """The parameters of some blocks: bytes [rows, n, nbytes] (codes inside are ignored), stats
    [rows, n] (nf4/fp4 absmax, int8 scales; empty for ggml formats) and the grid they define."""

    data: np.ndarray
    stats: np.ndarray
    scale: torch.Tensor  # [rows, n * block]: A (sym/table); unused for affine
    grid: torch.Tensor | None  # affine: [rows, n * block, levels]
    inv: torch.Tensor | None = None  # legacy rounding: ggml's unrounded 1/d per weight
    low: torch.Tensor | None = None  # q4_1/q5_1: the block minimum per weight
    zero: torch.Tensor | None = None  # grouped integers: the group's zero per weight
    rscale: torch.Tensor | None = None  # grouped integers: the unrounded f32 scale per weight


def _widen(name: str) -> property:
    def get(self: GroupBlocks) -> torch.Tensor:
        t = self._full.get(name)
        if t is None:
            t = self._full[name] = torch.repeat_interleave(self.groups[name], self.group, dim=1)
        return t

    return property(get)


class GroupBlocks(Blocks):
    """`Blocks` of a grouped integer format whose scale / zero / rscale are kept per group of
    `group` columns (`groups[name]`: [rows, n] float32) and widened to per weight on first
    read."""

    def __init__(
        self, data: np.ndarray, stats: np.ndarray, group: int, groups: dict[str, torch.Tensor]
    ) -> None:
        self.data, self.stats = data, stats
        self.grid = self.inv = self.low = None
        self.group, self.groups = group, groups
        self._full: dict[str, torch.Tensor] = {}

    scale = _widen("scale")  # type: ignore[assignment]
    zero = _widen("zero")  # type: ignore[assignment]
    rscale = _widen("rscale")  # type: ignore[assignment]


def _pick(mask: torch.Tensor, block: int, a: Any, b: Any) -> Any:
    """`b` where `mask` [rows, n] (per block) is set, else `a`; for a Blocks field of any of
    its shapes ([rows, n, ...] numpy, [rows, n * block, ...] torch, or None)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        if a.ndim < 2 or a.shape[1] != mask.shape[1]:  # no per-block stats (ggml formats)
            return a
        m = mask.numpy().reshape(mask.shape + (1,) * (a.ndim - 2))
        return np.where(m, b, a)
    m = torch.repeat_interleave(mask, block, dim=1)
    return torch.where(m.reshape(m.shape + (1,) * (a.dim() - 2)), b, a)


def select_blocks(mask: torch.Tensor, block: int, a: Blocks, b: Blocks) -> Blocks:
    """Blocks taking `b`'s parameters where `mask` [rows, n] is set and `a`'s elsewhere."""
    if isinstance(a, GroupBlocks) and isinstance(b, GroupBlocks) and a.group == block:
        groups = {f: torch.where(mask, b.groups[f], a.groups[f]) for f in _GROUP_FIELDS}
        data, stats = (_pick(mask, block, getattr(a, f), getattr(b, f)) for f in ("data", "stats"))
        return GroupBlocks(data, stats, block, groups)
    fields = ("data", "stats", "scale", "grid", "inv", "low", "zero", "rscale")
    return Blocks(**{f: _pick(mask, block, getattr(a, f), getattr(b, f)) for f in fields})


def gint_range(
    xmin: torch.Tensor, xmax: torch.Tensor, sym: bool, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the unrounded f32 scale, the adjusted minimum) of groups with `min(min(x), 0)` /
    `max(max(x), 0)` = `xmin` / `xmax`, as `formats/gint.rs`'s `range_params` computes them
    (GPTQ's `find_params`)."""
    if sym:
        xmax = torch.maximum(xmax, xmin.abs())
        xmin = torch.where(xmin < 0, -xmax, xmin)
        empty = xmax == 0
    else:
        empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, xmin - 1, xmin)
    xmax = torch.where(empty, xmax + 1, xmax)
    scale = (xmax - xmin) / float(maxq)
    tiny = torch.full_like(scale, np.finfo(np.float32).tiny)
    return torch.where(scale == 0, tiny, scale), xmin


def group_params(
    x: torch.Tensor, sym: bool, maxq: int, center: int, nbytes: int
) -> GroupBlocks | None:
    """The grouped integers' parameters of `x` [rows, n, group] (float32): the stored fp16
    scales and integer zeros (`stats` [rows, n, 1|2]) and the unrounded scales the codes are
    rounded by, the format's own quantizer's bit for bit (`formats/gint.rs`: `range_params`,
    `f16_round`; tests/test_gptq.py) without its codes, which a calibrated method replaces.
    The bytes are zeros (they hold only codes). None when a weight is not finite or beyond
    fp16's range, which the format's quantizer refuses (it then names the weight)."""
    lo, hi = torch.aminmax(x, dim=-1)
    if not (bool((lo >= -F16_MAX).all()) and bool((hi <= F16_MAX).all())):  # NaN too
        return None
    zero0 = torch.zeros((), dtype=torch.float32)
    rscale, xmin = gint_range(torch.minimum(lo, zero0), torch.maximum(hi, zero0), sym, maxq)
    scale = rscale.to(torch.float16).to(torch.float32)  # round to nearest even, as half's
    if sym:
        zero = torch.full_like(scale, float(center))
        stats = scale.numpy()[..., None]
    else:
        # round half to even (round_even: values from 2^22 on are integers or clamped anyway);
        # + 0.0 turns a -0.0 into the +0.0 the format stores
        zero = torch.round(-xmin / rscale).clamp_(0.0, float(maxq)).add_(0.0)
        stats = np.stack([scale.numpy(), zero.numpy()], axis=-1)
    rows, n, group = x.shape
    data = np.zeros((rows, n, nbytes), np.uint8)
    groups = {"scale": scale, "zero": zero, "rscale": rscale}
    return GroupBlocks(data, np.ascontiguousarray(stats, np.float32), group, groups)
