"""The grouped integers' parameters computed per group (`methods.blocks.group_params`, the
GPTQ / AWQ grids' fast path) against the format's own quantizer (`ferroquant.quantize`,
rust/core/src/formats/gint.rs), bit for bit, and `GroupBlocks` (per-group fields, widened on
read) against the per-weight `Blocks` it stands for."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.methods.blocks import Blocks, GroupBlocks, select_blocks
from ferroquant.methods.grid import SUPPORTED, FormatGrid
from ferroquant.qtypes import gint_params

torch = pytest.importorskip("torch")

GINT = tuple(q for q in SUPPORTED if gint_params(q) is not None)
FIELDS = ("scale", "grid", "inv", "low", "zero", "rscale")


def _weights(rows: int, cols: int, group: int, seed: int) -> np.ndarray:
    """Random weights with the groups a range rule can trip on: all zero, all positive, all
    negative, one subnormal weight, ties on the rounding grid, magnitudes from 1e-30 to 1e3."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= np.float32(10.0) ** rng.integers(-30, 4, (rows, 1)).astype(np.float32)
    g = w.reshape(rows, cols // group, group)
    kinds = rng.integers(0, 7, g.shape[:2])
    g[kinds == 1] = 0.0
    g[kinds == 2] = np.abs(g[kinds == 2])
    g[kinds == 3] = -np.abs(g[kinds == 3])
    g[kinds == 4] = 0.0
    g[kinds == 4, 0] = np.float32(3.0e-39)  # a subnormal range: the scale's floor
    g[kinds == 5] = np.round(g[kinds == 5] * 4) / 4  # ties
    return w


def _plain(p: GroupBlocks) -> Blocks:
    """The per-weight Blocks a GroupBlocks stands for."""
    return Blocks(p.data, p.stats, p.scale.clone(), None, zero=p.zero.clone(),
                  rscale=p.rscale.clone())  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(qtype=st.sampled_from(GINT), rows=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_group_params_are_the_format_quantizers(qtype, rows, seed):
    # the codes the parameters round to and the stored bytes: the format's own, bit for bit
    cols = 256
    grid = FormatGrid(qtype, (rows, cols))
    w = _weights(rows, cols, grid.block, seed)
    p = grid.params(torch.from_numpy(w))
    assert isinstance(p, GroupBlocks)
    lev, val = grid.quantize_column(p, slice(None), torch.from_numpy(w))
    ref = fq.quantize(w, qtype)
    got = grid.qtensor([p], lev.numpy())
    assert np.array_equal(np.asarray(got.data), np.asarray(ref.data))
    assert np.asarray(got.stats).tobytes() == np.asarray(ref.stats).tobytes()  # -0.0 too
    assert np.array_equal(val.numpy(), fq.dequantize(ref))


@pytest.mark.parametrize("qtype", ("int4_g64", "int3_g32_sym", "int2_gch", "int8_g128_sym"))
def test_group_blocks_read_as_the_per_weight_blocks(qtype):
    cols = 256
    grid = FormatGrid(qtype, (5, cols))
    g = torch.Generator().manual_seed(3)
    a = grid.params(torch.randn(5, cols, generator=g))
    b = grid.params(torch.randn(5, cols, generator=g) * 3)
    for name in FIELDS:
        t = getattr(a, name)
        if t is not None:
            assert t.shape == (5, cols), name
            assert torch.equal(t, a.groups[name].repeat_interleave(grid.block, dim=1)), name
    cols_g, cols_w = grid.param_columns(a), grid.param_columns(_plain(a))
    for name in FIELDS:
        x, y = cols_g.fields[name], cols_w.fields[name]
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.is_contiguous() and torch.equal(x, y), name
    mask = torch.rand(5, cols // grid.block, generator=g) < 0.5
    sel, ref = select_blocks(mask, grid.block, a, b), select_blocks(mask, grid.block, _plain(a),
                                                                    _plain(b))  # fmt: skip
    assert isinstance(sel, GroupBlocks)
    assert np.array_equal(sel.data, ref.data) and np.array_equal(sel.stats, ref.stats)
    for name in FIELDS:
        x, y = getattr(sel, name), getattr(ref, name)
        assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf"), 7e4, -65505.0))
def test_weights_the_format_refuses_are_named(bad):
    # non-finite or beyond fp16's range: the format's quantizer's error, naming the weight
    w = torch.randn(3, 128)
    w[1, 70] = bad
    with pytest.raises(fq.QuantizeError, match="row 1, column 70"):
        FormatGrid("int4_g64", (3, 128)).params(w)
