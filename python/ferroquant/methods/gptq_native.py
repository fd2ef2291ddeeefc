"""GPTQ's column loop in the Rust core (`_native.gptq_columns`, rust/core/src/gptq/).

`gptq.py`'s Python loop is the reference. This driver runs the same lazy batches: Python still
fixes every block's parameters with the format's own quantizer (`FormatGrid.params` /
`searched_params`, static or as GPTQ reaches the block) and runs the update of the later
batches (one GEMM per batch); the column loop inside a batch (rounding by the format's rule,
the error, the rank-1 updates) runs compiled, with the GIL released. Every format `grid.py`
knows has a rule (`rule_of` mirrors `FormatGrid._round` branch for branch), and the stored
bytes equal the Python loop's (tests/test_gptq_native.py, every format, both column orders).
`ENABLED = False`, or an extension built without `gptq_columns`, runs the Python loop.

One numerical difference is allowed on this path, and only one: the factor is computed in
float32 (`CHOLESKY_DTYPE`), in the LDL form (`LDL_FORM`, `gptq._ldl_update`: one Cholesky of
the flipped Hessian, no inverse; the loop pushes each column's error against its original
weights, the same algorithm as the inverse factor's) instead of the reference's three float64
factorizations of U = chol(H^-1) (session 14: one float32 Cholesky and a triangular inverse by
GEMMs, `gptq._upper_inverse_factor`, kept behind `LDL_FORM = False`). The codes then differ
from the reference's where a weight sits near a rounding boundary; the calibration-weighted
error tr((W - Q) H (W - Q)^T) they reach is tested to stay within 1 % of the reference's
(hypothesis, tests/test_gptq_native.py; session 10's three float32 factorizations measured:
within 0.1 % on 120 random problems, 5 formats, both column orders, rank-deficient Hessians
included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import _native
from .grid import Blocks, Columns, FormatGrid

ENABLED = True  # False: gptq.py's Python column loop (the reference) for every format
# the precision of the inverse Hessian's factorizations on this path: float32, as the GPTQ
# paper's code and both peers (GPTQModel, llm-compressor) factor it; the reference loop keeps
# float64. torch.float64 here gives the reference's bytes exactly (tests/test_gptq_native.py).
CHOLESKY_DTYPE = torch.float32
# the float32 factor in the LDL form (`gptq._ldl_update`: one Cholesky, no triangular inverse)
# on both loops; False: the inverse factor U (one Cholesky and a triangular inverse by GEMMs)
LDL_FORM = True

_FIELDS = ("scale", "inv", "low", "zero", "rscale", "grid")


def available() -> bool:
    """Whether the compiled column loop is used (enabled and present in the extension)."""
    return ENABLED and hasattr(_native, "gptq_columns")


def has_ldl() -> bool:
    """Whether this extension's `gptq_columns` runs the LDL form (`from_original`)."""
    sig = getattr(_native.gptq_columns, "__text_signature__", None) or ""
    return "from_original" in sig


def solve_order(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """W^T with its rows permuted, [cols, rows] (row p: natural column perm[p]), contiguous:
    one cache-blocked pass in Rust (`_native.gptq_gather_t`) where present, else torch's."""
    if not hasattr(_native, "gptq_gather_t"):
        return w.t()[perm].contiguous()
    src = w.detach().to(torch.float32).contiguous().numpy()
    return torch.from_numpy(_native.gptq_gather_t(src, perm.numpy()))


def permuted_f32(h: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """H[order][:, order] in float32 (each value rounded once, as `.to(float32)` rounds it),
    from H float64 [n, n]: one pass in Rust (`_native.gptq_permute_f32`) where present, else
    torch's conversion and two `index_select`s (the same values)."""
    if h.dtype != torch.float64 or not hasattr(_native, "gptq_permute_f32"):
        return h.to(torch.float32).index_select(0, order).index_select(1, order)
    src = h.detach().contiguous().numpy()
    return torch.from_numpy(_native.gptq_permute_f32(src, order.numpy()))


def natural_order(values_t: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
    """The loop's values [cols, rows] (solve order) back to [rows, cols], natural order
    (`solve_order`'s inverse with `inv_perm`), contiguous."""
    if not hasattr(_native, "gptq_gather_t"):
        return values_t.index_select(0, inv_perm).t().contiguous()
    return torch.from_numpy(_native.gptq_gather_t(values_t.numpy(), inv_perm.numpy(), rows=True))


def packs() -> bool:
    """Whether the codes are packed by the Rust core (`_native.gptq_pack`) on this path."""
    return available() and hasattr(_native, "gptq_pack")


def rule_of(grid: FormatGrid) -> dict[str, Any]:
    """The Rust rounding rule (and its constants) of `grid`'s format: the branch of
    `FormatGrid._round` / `_value` that format takes, in the same order."""
    q, lay = grid.qtype, grid.layout
    top = lay.levels - 1
    if q in ("q4_0", "q5_0"):
        offset = 8.5 if q == "q4_0" else 16.5
        return {"rule_name": "legacy_sym", "offset": offset, "center": lay.center, "top": top}
    if q in ("q4_1", "q5_1"):
        return {"rule_name": "legacy_affine", "top": top}
    if q == "q8_0":
        return {"rule_name": "q8"}
    if lay.kind == "zero":
        return {"rule_name": "zero", "top": grid._maxq}
    if q == "int8":
        return {"rule_name": "int8"}
    if q in ("nf4", "fp4"):
        return {
            "rule_name": "bnb",
            "table": np.ascontiguousarray(lay.table, np.float32),
            "bounds": grid._bounds.numpy().astype(np.float32),
            "order": grid._order.numpy().astype(np.int64),
        }
    if lay.kind == "sym":
        return {"rule_name": "sym", "center": lay.center, "top": top}
    if lay.kind == "table":
        return {"rule_name": "table", "table": np.ascontiguousarray(lay.table, np.float32)}
    return {"rule_name": "nearest"}


def _solve(
    rule: dict[str, Any],
    buffers: tuple[np.ndarray, ...],
    cols: Columns,
    cmap: np.ndarray,
    start: int,
    end: int,
    propagate: bool,
    ldl: bool,
) -> None:
    """Columns start..end of a batch; column start + c reads `cols`' parameter column
    cmap[c] (`FormatGrid.param_columns`)."""
    args: dict[str, Any] = {}
    for name in _FIELDS:
        t = cols.fields.get(name)
        if t is not None:
            args[name] = t.numpy().reshape(-1)
    if cols.fields.get("grid") is not None:
        args["grid_levels"] = int(cols.fields["grid"].shape[-1])
    consts = {k: v for k, v in rule.items() if k != "rule_name"}
    _native.gptq_columns(rule["rule_name"], *buffers, start, end, propagate, **consts, **args,
                         map=np.ascontiguousarray(cmap, dtype=np.int64),
                         **({"from_original": True} if ldl else {}))  # fmt: skip


def column_loop(
    grid: FormatGrid,
    wt: torch.Tensor,
    hinv: torch.Tensor,
    levels_t: torch.Tensor,
    values_t: torch.Tensor,
    *,
    static: bool,
    params: Blocks | None,
    perm: torch.Tensor,
    lazy: int,
    block_params: Callable[[torch.Tensor, int], Blocks],
    propagate: bool,
    ldl: bool = False,
) -> list[Blocks]:
    """gptq.py's loop over lazy batches with the compiled column loop: fills `levels_t` /
    `values_t` ([cols, rows], permuted order), updates `wt` in place and returns the blocks'
    parameters fixed on the way (natural order; empty with static groups). The parameters go
    over once per parameter block (`FormatGrid.param_columns`), each column reading its own
    through a map, not transposed per column. `ldl`: the LDL form (`gptq._ldl_update`): the
    error buffer of a batch is the batch's slice of a copy of the original weights, which the
    loop turns into w_orig - q in place."""
    rule = rule_of(grid)
    cols = wt.shape[0]
    fb = grid.block
    pb = grid.param_block
    blocks: list[Blocks] = []
    if static:
        assert params is not None
        cur = grid.param_columns(params)
        cmap = perm.numpy() // pb
    orig = wt.clone() if ldl and propagate else None
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        n = i2 - i1
        w1 = wt[i1:i2]  # a view: updated in place through numpy
        # every row is written before it is read (only read with propagate): no zero fill
        err1 = orig[i1:i2] if orig is not None else torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2].contiguous()
        buffers = (
            w1.numpy(),
            h1.numpy(),
            err1.numpy(),
            levels_t[i1:i2].numpy(),
            values_t[i1:i2].numpy(),
        )
        if static:
            _solve(rule, buffers, cur, cmap[i1:i2], 0, n, propagate, ldl)
        else:
            local = np.arange(fb) // pb
            for s in range(0, n, fb):
                blk = block_params(w1[s : s + fb].t(), i1 + s)
                blocks.append(blk)
                _solve(rule, buffers, grid.param_columns(blk), local, s, s + fb, propagate, ldl)
        if propagate and i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    return blocks
