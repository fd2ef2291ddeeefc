"""A format's own grid, column by column: what a calibrated method needs from a qtype.

A method such as GPTQ fixes the parameters of a block (its scales, minimums, absmax) with the
format's own quantizer (`ferroquant.quantize` on the block's current values), then chooses the
code of each weight one column at a time. This module keeps those parameters as bytes, exactly
as the format stores them, and reads the grid they define back through `ferroquant.dequantize`,
so the value a method gets for a code is, bit for bit, what the final tensor decodes to:

- "sym" formats (q4_0, q5_0, q8_0, q3_k, q6_k, int8): value = A * (level - c), one float32
  product, with A read as the value of level c + 1;
- "table" formats (nf4, fp4, iq4_nl, iq4_xs): value = A * T[level], A read at T's entry 1.0;
- "affine" formats (q4_1, q5_1, q4_k, q5_k, q2_k): value = d * level -/+ m, two roundings, so
  every level's value is read (a table of 2^bits values per weight);
- "zero" formats (the grouped integers int{2,3,4,8}_g*): value = s * (level - z) with the
  group's stored fp16 scale s and integer zero z (`formats/gint.rs`; one exact f32 product).

Rounding: the legacy formats (q4_0, q4_1, q5_0, q5_1, q8_0) round as ggml does with the block's
unrounded scale; int8 rounds half to even by the scale, the grouped integers half to even by
the group's unrounded f32 scale, plus the zero (GPTQ's `clamp(round(w / s) + z, 0, maxq)`);
nf4/fp4 bucket as bitsandbytes does;
the K-quants and iq4 take the nearest value of the stored grid (ggml's K-quants choose their
final codes that way too). A column of unchanged weights therefore gets the codes the format's
own round-to-nearest gives (iq4's scale search aside).

The codes are written into the block bytes through a bit map per format (element -> byte, bit),
so the result is an ordinary tensor of the format: nothing new for our kernels or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import _native
from ..qtypes import gint_params, qtype_info
from ..qtypes import qtypes as _all_qtypes
from ..tensor import QTensor, QuantizeError, dequantize, quantize
from .blocks import Blocks, GroupBlocks, group_params, select_blocks

_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)  # fmt: skip
_FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                 dtype=np.float32) / np.float32(12.0)).astype(np.float32)  # fmt: skip
_FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3])
_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                dtype=np.float32)  # fmt: skip

# a Blocks' per-weight torch fields, in the order the column loops read them
_FIELDS = ("scale", "grid", "inv", "low", "zero", "rscale")

# the formats whose own quantizer takes a block's scale from its absmax (min / max)
_ABSMAX_FORMATS = ("q4_0", "q5_0", "q8_0", "q4_1", "q5_1", "nf4", "fp4", "int8")

# the formats this module knows; the rest (fp8) have no integer grid to search
SUPPORTED = (
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "iq4_xs", "nf4", "fp4", "int8",
    "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    *(q.name for q in _all_qtypes() if gint_params(q.name) is not None),
)  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where a block keeps its codes: `byte[e, b]` / `shift[e, b]` hold bit b of element e's
    level (level ^ xor is what is stored); the other bytes are the block's parameters."""

    qtype: str
    bits: int
    block: int  # weights per block (columns that share parameters)
    nbytes: int  # bytes per block
    byte: np.ndarray
    shift: np.ndarray
    xor: int
    kind: str  # sym | table | affine | zero
    center: int = 0  # sym: value = A * (level - center)
    table: np.ndarray | None = None  # table: value = A * table[level]
    unit: int = 0  # the level whose value is A

    @property
    def levels(self) -> int:
        return 1 << self.bits


def _nibbles(e: np.ndarray, half: int, offset: int, bits: int = 4) -> tuple[np.ndarray, ...]:
    """ggml's q4_0-style packing: element j in the low nibble of byte j, j + half in the high."""
    byte = offset + (e % half)
    base = 4 * (e // half)
    return (np.repeat(byte[:, None], bits, 1), base[:, None] + np.arange(bits)[None, :])


def _layout(qtype: str, block: int, cols: int) -> Layout:  # noqa: PLR0911, PLR0915
    e = np.arange(block)
    b4 = np.arange(4)
    gi = gint_params(qtype)
    if gi is not None:  # one little-endian bit stream a row: code j in bits j*b .. (j+1)*b
        bit = e[:, None] * gi.bits + np.arange(gi.bits)[None, :]
        return Layout(qtype, gi.bits, block, block * gi.bits // 8, bit // 8, bit % 8, 0, "zero")
    if qtype in ("q4_0", "iq4_nl", "q4_1"):
        off = 4 if qtype == "q4_1" else 2
        by, sh = _nibbles(e, 16, off)
        if qtype == "q4_0":
            return Layout(qtype, 4, 32, 18, by, sh, 0, "sym", center=8, unit=9)
        if qtype == "q4_1":
            return Layout(qtype, 4, 32, 20, by, sh, 0, "affine")
        return Layout(qtype, 4, 32, 18, by, sh, 0, "table", table=_IQ4, unit=8)
    if qtype in ("q5_0", "q5_1"):
        qh, qs = (2, 6) if qtype == "q5_0" else (4, 8)
        by, sh = _nibbles(e, 16, qs)
        by = np.concatenate([by, (qh + e // 8)[:, None]], 1)
        sh = np.concatenate([sh, (e % 8)[:, None]], 1)
        if qtype == "q5_0":
            return Layout(qtype, 5, 32, 22, by, sh, 0, "sym", center=16, unit=17)
        return Layout(qtype, 5, 32, 24, by, sh, 0, "affine")
    if qtype == "q8_0":
        by = np.repeat((2 + e)[:, None], 8, 1)
        sh = np.repeat(np.arange(8)[None, :], 32, 0)
        return Layout(qtype, 8, 32, 34, by, sh, 0x80, "sym", center=128, unit=129)
    if qtype == "int8":
        by = np.repeat(e[:, None], 8, 1)
        sh = np.repeat(np.arange(8)[None, :], block, 0)
        return Layout(qtype, 8, block, block, by, sh, 0x80, "sym", center=128, unit=129)
    if qtype in ("nf4", "fp4"):
        by = np.repeat((e // 2)[:, None], 4, 1)
        sh = (4 * (1 - e % 2))[:, None] + b4[None, :]
        tab, unit = (_NF4, 15) if qtype == "nf4" else (_FP4, 3)
        return Layout(qtype, 4, block, block // 2, by, sh, 0, "table", table=tab, unit=unit)
    if qtype == "iq4_xs":
        ib, j = e // 32, e % 32
        by = np.repeat((8 + 16 * ib + j % 16)[:, None], 4, 1)
        sh = (4 * (j // 16))[:, None] + b4[None, :]
        return Layout(qtype, 4, 256, 136, by, sh, 0, "table", table=_IQ4, unit=8)
    if qtype in ("q4_k", "q5_k"):
        qs = 16 if qtype == "q4_k" else 48
        c, r = e // 64, e % 64
        by = np.repeat((qs + 32 * c + r % 32)[:, None], 4, 1)
        sh = (4 * (r // 32))[:, None] + b4[None, :]
        if qtype == "q4_k":
            return Layout(qtype, 4, 256, 144, by, sh, 0, "affine")
        by = np.concatenate([by, (16 + r % 32)[:, None]], 1)
        sh = np.concatenate([sh, (2 * c + r // 32)[:, None]], 1)
        return Layout(qtype, 5, 256, 176, by, sh, 0, "affine")
    if qtype in ("q2_k", "q3_k"):
        qs = 16 if qtype == "q2_k" else 32
        low = qs + (e // 128) * 32 + e % 32
        by = np.repeat(low[:, None], 2, 1)
        sh = (2 * ((e % 128) // 32))[:, None] + np.arange(2)[None, :]
        if qtype == "q2_k":
            return Layout(qtype, 2, 256, 84, by, sh, 0, "affine")
        by = np.concatenate([by, (e % 32)[:, None]], 1)
        sh = np.concatenate([sh, (e // 32)[:, None]], 1)
        return Layout(qtype, 3, 256, 110, by, sh, 0, "sym", center=4, unit=5)
    if qtype == "q6_k":
        h, r = e // 128, e % 128
        q, ln = r // 32, r % 32
        lo = 64 * h + ln + 32 * (q % 2)
        by = np.concatenate([np.repeat(lo[:, None], 4, 1),
                             np.repeat((128 + 32 * h + ln)[:, None], 2, 1)], 1)  # fmt: skip
        sh = np.concatenate([(4 * (q // 2))[:, None] + b4[None, :],
                             (2 * q)[:, None] + np.arange(2)[None, :]], 1)  # fmt: skip
        return Layout(qtype, 6, 256, 210, by, sh, 0, "sym", center=32, unit=33)
    raise QuantizeError(
        f"{qtype} has no integer grid a calibrated method can search; "
        f"supported: {' '.join(SUPPORTED)}"
    )


def pack_levels(lay: Layout, data: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Block bytes `data` [..., nbytes] with every code replaced by `levels` [..., block]."""
    by, sh, bit, dest = _bit_plan(lay)
    raw = (levels.astype(np.int64) ^ lay.xor).astype(np.uint8).reshape(-1, lay.block)
    # each code bit (element e, bit b) lands at bit `sh` of byte `by`; the bits of one byte are
    # disjoint, so adding the byte's contributions (sorted by byte: one reduceat) is their OR
    contrib = ((raw[:, bit[0]] >> bit[1]) & 1) << sh
    packed = np.add.reduceat(contrib, dest, axis=1, dtype=np.uint8)
    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, lay.nbytes).copy()
    keep = _code_mask(lay)
    flat[:, by] &= keep[by]
    flat[:, by] |= packed
    return flat.reshape(data.shape)


def _bit_plan(lay: Layout) -> tuple[np.ndarray, ...]:
    """(the bytes holding codes, the shifts, (element, bit) of each contribution, where each
    byte's contributions start), the contributions sorted by byte."""
    e = np.repeat(np.arange(lay.block), lay.byte.shape[1])
    b = np.tile(np.arange(lay.byte.shape[1]), lay.block)
    byte, shift = lay.byte.reshape(-1), lay.shift.reshape(-1)
    order = np.argsort(byte, kind="stable")
    byte, shift, e, b = byte[order], shift[order], e[order], b[order]
    starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
    return byte[starts], shift.astype(np.uint8), (e, b.astype(np.uint8)), starts


def _code_mask(lay: Layout) -> np.ndarray:
    """Per byte of a block: the bits that are not code bits (kept from `data`)."""
    code = np.zeros(lay.nbytes, np.int64)
    np.bitwise_or.at(code, lay.byte.reshape(-1), 1 << lay.shift.reshape(-1))
    return (~code & 0xFF).astype(np.uint8)


def fill_level(lay: Layout, data: np.ndarray, level: int) -> np.ndarray:
    """`pack_levels(lay, data, level everywhere)`, from one block's byte pattern (the same in
    every block): the fast path for reading a grid's values back."""
    lev = np.full((1, lay.block), level)
    pattern = pack_levels(lay, np.zeros((1, lay.nbytes), np.uint8), lev)[0]
    ones = pack_levels(lay, np.full((1, lay.nbytes), 0xFF, np.uint8), lev)[0]
    code = ~(ones ^ pattern)  # the bits pack_levels writes: equal whatever the old byte was
    return (data & ~code) | pattern


def unpack_levels(lay: Layout, data: np.ndarray) -> np.ndarray:
    """The levels [..., block] stored in block bytes `data` [..., nbytes]."""
    lev = np.zeros((*data.shape[:-1], lay.block), np.int64)
    for b in range(lay.byte.shape[1]):
        lev |= ((data[..., lay.byte[:, b]].astype(np.int64) >> lay.shift[:, b]) & 1) << b
    return lev ^ lay.xor


class FormatGrid:
    """The grid of `qtype` for a [rows, cols] weight: `params(values, first_block)` fixes blocks'
    parameters with the format's own quantizer, `quantize_column` chooses codes, `qtensor`
    writes the final bytes. `options` are `ferroquant.quantize`'s (block_size, scale_mode)."""

    def __init__(self, qtype: str, shape: tuple[int, int], **options: Any) -> None:
        self.qtype = qtype_info(qtype).name
        if options.get("double_quant"):
            raise QuantizeError(
                "double_quant=True re-quantizes the absmax after the method chose its codes; "
                "calibrated methods write nf4/fp4 with float32 absmax (double_quant=False)"
            )
        if self.qtype == "int8" and options.get("scale_mode", "row") == "tensor":
            raise QuantizeError("int8 scale_mode='tensor' is not supported by calibrated methods")
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.options = {k: v for k, v in options.items() if v is not None}
        probe = quantize(np.zeros((1, self.cols), np.float32), self.qtype, **self.options)
        self.block_size, self.scale_mode = probe.block_size, probe.scale_mode
        block = self.cols if self.scale_mode == "row" else probe.block_size
        if self.cols % block:
            raise QuantizeError(
                f"{self.qtype}: rows of {self.cols} are not whole blocks of {block}"
            )
        self.layout = _layout(self.qtype, block, self.cols)
        self.block = block
        self.n_blocks = self.cols // block
        if self.qtype in ("nf4", "fp4"):
            self._bounds, self._order = _bnb_bounds(self.layout.table, self.qtype)
        gi = gint_params(self.qtype)
        if gi is not None:
            self._center, self._maxq, self._sym = 1 << (gi.bits - 1), (1 << gi.bits) - 1, gi.sym

    # -- parameters -----------------------------------------------------------------------

    def params(self, values: torch.Tensor) -> Blocks:
        """Parameters of the blocks that `values` [rows, k * block] covers, from the format's own
        quantizer on those values."""
        v = values.detach().to(torch.float32).contiguous()
        n = v.shape[1] // self.block
        lay = self.layout
        if lay.kind == "zero":  # per group, without the codes (`blocks.group_params`)
            x = v.reshape(self.rows, n, lay.block)
            got = group_params(x, self._sym, self._maxq, self._center, lay.nbytes)
            if got is None:  # a weight out of range: the format's quantizer names it
                quantize(v.numpy(), self.qtype, **self.options)
                raise QuantizeError(f"{self.qtype}: weights out of range")
            return got
        qt = quantize(v.numpy(), self.qtype, **self.options)
        data = np.asarray(qt.data).reshape(self.rows, n, self.layout.nbytes)
        stats = np.asarray(qt.stats, np.float32).reshape(self.rows, n if qt.stats.size else 0)

        def values_at(level: int) -> torch.Tensor:
            d = fill_level(lay, data, level)
            y = dequantize(self._qtensor(d, stats, v.shape[1]))
            return torch.from_numpy(np.ascontiguousarray(y))

        grid = None
        scale = values_at(lay.unit)
        if lay.kind == "affine":
            grid = torch.stack([values_at(k) for k in range(lay.levels)], dim=-1)
        inv = low = None
        if self.qtype in ("q4_0", "q5_0", "q8_0", "q4_1", "q5_1"):
            inv, low = _ggml_legacy(self.qtype, v.reshape(self.rows, n, lay.block))
        return Blocks(data, stats, scale, grid, inv, low)

    @property
    def searchable(self) -> bool:
        """Whether the format's own quantizer sets a block's parameters from its absmax or
        min / max alone (the K-quants and iq4 search their scales already)."""
        return self.qtype in _ABSMAX_FORMATS or self.layout.kind == "zero"

    def searched_params(
        self, values: torch.Tensor, weight: torch.Tensor, factors: tuple[float, ...]
    ) -> Blocks:
        """Parameters of the blocks `values` [rows, k * block] covers, each block's chosen
        among the format's own parameters of `values * f` for f in `factors` (1.0 is always
        a candidate) by the least `weight`-weighted squared rounding error sum_j w_j (x_j -
        q_j)^2 (`weight` [k * block]: the Hessian's diagonal). Shrinking the range clips a
        few large weights to round the rest more finely: GPTQ's "mse" grid search, weighted
        as llama.cpp's importance-matrix quantizers weight theirs. The parameters are still
        the format's own, so the bytes stay an ordinary tensor of it."""
        v = values.detach().to(torch.float32)
        rows, k = v.shape
        n = k // self.block
        wt = weight.detach().to(torch.float32).reshape(1, n, self.block)

        def err(p: Blocks) -> torch.Tensor:
            _, q = self.quantize_column(p, slice(None), v)
            return ((v - q).reshape(rows, n, self.block) ** 2 * wt).sum(-1)

        best = self.params(v)
        best_err = err(best)
        for f in factors:
            if f == 1.0:
                continue
            cand = self.params(v * f)
            e = err(cand)
            better = e < best_err
            if bool(better.any()):
                best = select_blocks(better, self.block, best, cand)
                best_err = torch.where(better, e, best_err)
        return best

    def _qtensor(self, data: np.ndarray, stats: np.ndarray, cols: int) -> QTensor:
        if self.layout.kind == "zero":  # [rows, n, 1|2] -> per row: the scales, then the zeros
            stats = stats.transpose(0, 2, 1)
        return QTensor(
            self.qtype,
            (self.rows, cols),
            np.ascontiguousarray(data).reshape(-1),
            self.block_size,
            np.ascontiguousarray(stats, np.float32).reshape(-1),
            self.scale_mode,
        )

    # -- one column -------------------------------------------------------------------------

    def quantize_column(
        self, p: Blocks, j: int | slice, w: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """(levels, values) of column `j` of the blocks `p` for the weights `w` [rows] (or of
        the columns `j`, a slice, for `w` [rows, k]: the same rounding, vectorised)."""
        return self._round(lambda f: None if (t := getattr(p, f)) is None else t[:, j], w)

    @property
    def param_block(self) -> int:
        """Consecutive columns that share every parameter (a block, or a K-quant / iq4_xs
        sub-block): a Blocks field is constant over each run of them in a row."""
        if self.qtype in ("q2_k", "q3_k", "q6_k"):
            return 16
        if self.qtype in ("q4_k", "q5_k", "iq4_xs"):
            return 32
        return self.block

    def param_columns(self, p: Blocks) -> Columns:
        """The parameters of `p`, one column per `param_block` columns, transposed (one
        contiguous [rows] vector, [rows, levels] for the affine grids, each): what a compiled
        column loop reads through a column -> parameter column map (`param_block` apart)
        instead of one copy per column."""
        if isinstance(p, GroupBlocks) and p.group == self.param_block:  # kept per group
            g = p.groups
            fields = {f: g[f].transpose(0, 1).contiguous() if f in g else None for f in _FIELDS}
            return Columns(self, fields)
        fields = {}
        for f in _FIELDS:
            t = getattr(p, f)
            if t is not None:
                t = t[:, :: self.param_block].transpose(0, 1).contiguous()
            fields[f] = t
        return Columns(self, fields)

    def columns(self, p: Blocks, cols: torch.Tensor | slice) -> Columns:
        """The parameters of `p` at columns `cols` (indices or a slice), transposed: one
        contiguous [rows] vector a column (`Columns.quantize(i, w)`), for a column loop."""
        fields = {}
        for f in ("scale", "grid", "inv", "low", "zero", "rscale"):
            t = getattr(p, f)
            if t is not None:  # index_select: the same copy, 4-6x faster than t[:, cols]
                t = t[:, cols] if isinstance(cols, slice) else t.index_select(1, cols)
                t = t.transpose(0, 1).contiguous()
            fields[f] = t
        return Columns(self, fields)

    def _round(self, at: Any, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, values) of weights `w` whose parameters `at(field)` gives (Blocks' fields at
        the same positions as `w`)."""
        lay = self.layout
        q = self.qtype
        if q in ("q4_0", "q5_0"):
            t = w * at("inv") + (8.5 if q == "q4_0" else 16.5)
            lev = torch.clamp(torch.trunc(t), 0, lay.levels - 1)
        elif q in ("q4_1", "q5_1"):
            t = (w - at("low")) * at("inv") + 0.5
            lev = torch.clamp(torch.trunc(t), 0, lay.levels - 1)
        elif q == "q8_0":
            t = w * at("inv")
            r = torch.trunc(t)
            r = r + torch.sign(t) * ((t - r).abs() >= 0.5)
            lev = torch.clamp(r, -128, 127) + 128
        elif lay.kind == "zero":  # rounded by the unrounded scale, as the format's quantizer
            lev = torch.clamp(torch.round(w / at("rscale")) + at("zero"), 0, self._maxq)
        elif q == "int8":
            a = at("scale")
            d = torch.where(a == 0, torch.ones_like(a), a)
            lev = torch.clamp(torch.round(w / d), -127, 127) + 128
        elif q in ("nf4", "fp4"):
            r = 1.0 / torch.clamp(at("scale"), min=1e-38)
            x = (w * r).contiguous()
            if x.dim() == 1:
                idx = torch.searchsorted(self._bounds, x, right=False)
            else:  # the same buckets (finite x), several times faster than searchsorted in 2-D
                idx = torch.zeros(x.shape, dtype=torch.int64)
                for b in self._bounds:
                    idx += x > b
            lev = self._order[idx]
        elif lay.kind == "sym":  # q3_k, q6_k: nearest_int(x / d)
            a = at("scale")
            safe = torch.where(a == 0, torch.ones_like(a), a)
            lev = torch.clamp(torch.round(w / safe), -lay.center, lay.levels - 1 - lay.center)
            lev = torch.where(a == 0, torch.zeros_like(lev), lev) + lay.center
        elif lay.kind == "table":  # iq4: the nearest entry
            vals = at("scale")[..., None] * self._table
            lev = (vals - w[..., None]).abs().argmin(-1)
        else:  # affine K-quants: the nearest stored value
            lev = (at("grid") - w[..., None]).abs().argmin(-1)
        lev = lev.to(torch.int64)
        return lev, self._value(at, lev)

    @property
    def _table(self) -> torch.Tensor:
        tab = self.__dict__.get("_table_t")
        if tab is None:
            tab = self.__dict__["_table_t"] = torch.from_numpy(self.layout.table)
        return tab

    def value(self, p: Blocks, j: int | slice, lev: torch.Tensor) -> torch.Tensor:
        """The decoded values of levels `lev` in column `j` of the blocks `p`."""
        return self._value(lambda f: None if (t := getattr(p, f)) is None else t[:, j], lev)

    def _value(self, at: Any, lev: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if lay.kind == "zero":
            return at("scale") * (lev.to(torch.float32) - at("zero"))
        if lay.kind == "sym":
            return at("scale") * (lev - lay.center).to(torch.float32)
        if lay.kind == "table":
            return self._table[lev] * at("scale")
        return at("grid").gather(-1, lev[..., None])[..., 0]

    # -- the result ---------------------------------------------------------------------------

    def qtensor(self, blocks: list[Blocks], levels: np.ndarray) -> QTensor:
        """The tensor of the format: parameters of every block (in column order) and the
        levels [rows, cols] the method chose."""
        data = np.concatenate([b.data for b in blocks], axis=1)
        stats = np.concatenate([b.stats for b in blocks], axis=1)
        lev = levels.reshape(self.rows, self.n_blocks, self.block)
        return self._qtensor(pack_levels(self.layout, data, lev), stats, self.cols)

    def qtensor_solved(
        self, blocks: list[Blocks], levels_t: np.ndarray, perm: np.ndarray
    ) -> QTensor:
        """`qtensor` of the levels as a column loop leaves them: `levels_t` [cols, rows] uint8,
        row p holding natural column perm[p]; packed by the Rust core (`_native.gptq_pack`,
        the same bytes as `pack_levels`: tests/test_gptq_native.py) without un-permuting or
        transposing them first."""
        data = np.concatenate([b.data for b in blocks], axis=1)
        stats = np.concatenate([b.stats for b in blocks], axis=1)
        flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(self.rows, -1)
        lay = self.layout
        byte = np.ascontiguousarray(lay.byte.reshape(-1), dtype=np.int64)
        shift = np.ascontiguousarray(lay.shift.reshape(-1), dtype=np.int64)
        _native.gptq_pack(flat, np.ascontiguousarray(levels_t, dtype=np.uint8),
                          np.ascontiguousarray(perm, dtype=np.int64), lay.block, lay.nbytes,
                          lay.bits, byte, shift, lay.xor)  # fmt: skip
        return self._qtensor(flat.reshape(data.shape), stats, self.cols)


class Columns:
    """Blocks' parameters transposed to one contiguous [rows] vector a column (`FormatGrid.
    columns`): `quantize(i, w)` is `quantize_column` at the i-th of those columns, bit for
    bit, with a column loop's per-column cost (no strided gathers)."""

    def __init__(self, grid: FormatGrid, fields: dict[str, torch.Tensor | None]) -> None:
        self.grid, self.fields = grid, fields

    def quantize(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fields
        return self.grid._round(lambda name: None if f[name] is None else f[name][i], w)


def _bnb_bounds(code: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    order = _FP4_ORDER if qtype == "fp4" else np.arange(16)
    c = code[order]
    bounds = ((c[:-1] + c[1:]) / np.float32(2.0)).astype(np.float32)
    return torch.from_numpy(bounds), torch.from_numpy(order.astype(np.int64))


def _ggml_legacy(qtype: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ggml's unrounded 1/d (and min) per block of `x` [rows, n, 32], repeated per weight."""
    if qtype in ("q4_0", "q5_0"):
        idx = x.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as ggml
        mx = x.gather(-1, idx)[..., 0]
        d = mx / (-8.0 if qtype == "q4_0" else -16.0)
        low = None
    elif qtype == "q8_0":
        d = x.abs().amax(-1) / 127.0
        low = None
    else:
        mn, mx = x.amin(-1), x.amax(-1)
        d = (mx - mn) / (15.0 if qtype == "q4_1" else 31.0)
        low = mn[..., None].expand_as(x).reshape(x.shape[0], -1)
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return inv[..., None].expand_as(x).reshape(x.shape[0], -1), low
