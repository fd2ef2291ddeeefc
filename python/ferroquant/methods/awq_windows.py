"""AWQ's per-window pieces (`awq_layers`' searches see the calibration windows only through
`stats.windows.map`): each function runs on a list of windows (all of them here, one shard of
them in a Ray task) and returns one result per window, which the search adds in window order,
so `ferroquant.distributed` gets the same bits as one machine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..calib.capture import _Stop, forward_autocast, forward_dtype, shard_batches
from ..tensor import QuantizeError


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _batches(hidden: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of its first window, batch) for each of the capture's shard batches of `hidden`
    (`calib.capture.shard_batches`: the same batches on one machine and in a Ray task's shard)."""
    k = 0
    for batch in shard_batches(hidden):
        yield k, batch
        k += batch.shape[0]


def window_inputs(
    layer: nn.Module, call: Any, hidden: list[torch.Tensor], first: int, names: list[str],
    strided: list[str], step: int, where: str,
) -> list[dict[str, tuple[torch.Tensor, int, torch.Tensor | None]]]:  # fmt: skip
    """Per window: for each Linear of `names` (AWQ's scaled inputs) and `strided` (the clip
    search's), (the float64 sum over the window's tokens of |x| at its input, the number of
    tokens, the input rows whose index among all windows' tokens (windows of equal length,
    `first` the window's index) is a multiple of `step`, or None when the Linear is not in
    `strided`). One pass of the layer (a shard batch at a time, in the capture's precision,
    `forward_autocast`) before any fold serves every pair and the clip search, as AutoAWQ
    captures a layer's inputs once: a fold keeps the float function, so the later pairs' inputs
    are these (the clip search divides the scaled Linears' rows by their scale, as AutoAWQ's
    `apply_scale` does). The pass ends at the last hooked Linear's input. (The fallback where
    the capture has no |x| sums: `awq_layer` takes x_mean from them and the rows from the
    block searches' passes.)"""
    got: list[dict[str, tuple[torch.Tensor, int, torch.Tensor | None]]] = [{} for _ in hidden]
    at = [0]
    clip = set(strided)
    hooked = list(dict.fromkeys([*names, *strided]))
    fired: set[str] = set()  # the hooked Linears that had their input in this batch's pass

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            fired.add(name)
            x = args[0].detach().to(torch.float32)
            for j, xw in enumerate(x.reshape(-1, *x.shape[-2:])):  # one [L, d] per window
                rows = None
                if name in clip:
                    start = (first + at[0] + j) * xw.shape[0]
                    rows = xw[(-start) % step :: step]
                total = xw.abs().sum(0, dtype=torch.float64)
                # finite iff the window's inputs are (a float64 sum of float32 magnitudes
                # cannot overflow): d values to check instead of every activation
                if not bool(torch.isfinite(total).all()):
                    raise QuantizeError(
                        f"awq: non-finite activations at the input of {where}.{name}"
                    )
                got[at[0] + j][name] = (total, xw.shape[0], rows)
            if len(fired) == len(hooked):  # nothing after this input is read
                raise _Stop

        return pre

    hs = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in hooked]
    try:
        for k0, batch in _batches(hidden):
            at[0] = k0
            fired.clear()
            with forward_autocast(batch):
                try:
                    layer(batch, *call.args, **call.kwargs)
                except _Stop:
                    pass
    finally:
        for h in hs:
            h.remove()
    return got


def _search_dtype(x: Any, dtype: torch.dtype | None) -> Any:
    """A block's floating arguments in the forward's autocast dtype (None: unchanged): its input
    (which the block's Linears read in that dtype under autocast anyway) and e.g. the rotary
    position embeddings, so that the search's block calls compute the rotary products in bf16
    as the bf16 model does (float32 cos / sin promote q and k to float32 for that one step:
    a tenth of the search's time)."""
    if dtype is None:
        return x
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(_search_dtype(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _search_dtype(v, dtype) for k, v in x.items()}
    return x


def window_losses(
    layer: nn.Module,
    call: Any,
    hidden: list[torch.Tensor],
    first: int,
    searches: list[tuple[str, list[str], list[list[torch.Tensor]]]],
    select: tuple[int, bool] | None = None,
    rows: tuple[list[str], int] | None = None,
) -> list[tuple[list[list[float]], list[int], dict[str, torch.Tensor]]]:
    """Per window: for each search (block name, the Linears `names`, the candidates: each a
    list of those Linears' weights), for each candidate the sum of squared differences
    between the block's output with those weights and its float output (`squared_errors`); and
    each block output's element count (a candidate's loss: the sums added in window order over
    the counts). `select` = (stride, multiples): only the windows whose index among all windows
    is (multiples) or is not a multiple of stride run; the others get zero sums and counts
    (`search_pairs`' screen). The selected windows of a shard batch run as one batch, so a
    cluster's shards batch them the same way. One pass of the layer captures every block's
    inputs and output (before any fold: the searches are independent, as AutoAWQ searches a
    layer's pairs before applying any scale); each block then runs once per candidate and
    shard batch (not per window), in the capture's precision (`forward_autocast`, the blocks'
    other floating arguments in its dtype, `_search_dtype`); the per-window sums are taken
    from the batch's rows. `rows` = (Linear names, step): the same pass also takes, per
    selected window, those Linears' input rows whose index among all windows' tokens is a
    multiple of step (`window_inputs`' strided rows: the clip search's), the third item of each
    window's result ({} for the others); the pass then runs until the last of them."""
    blocks = [layer.get_submodule(b) for b, _, _ in searches]
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in searches]
    done = [0]  # shard batches whose layer pass has ended
    row_names, step = rows if rows is not None else ([], 1)
    got: list[dict[str, torch.Tensor]] = [{} for _ in hidden]
    fired: set[str] = set()  # the row Linears that had their input in this batch's pass

    def complete() -> None:
        # every block and row Linear has its inputs: the rest of the layer (e.g. the MLP after
        # the attention block) would compute nothing the search reads
        if len(fired) == len(row_names) and all(len(c) > done[0] for c in calls):
            raise _Stop

    def hook(i: int) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[i].append((args, dict(kwargs)))
            complete()

        return pre

    def row_hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            fired.add(name)
            x = args[0].detach().to(torch.float32)
            idx = batches[done[0]][0]
            for j, xw in zip(idx, x.reshape(-1, *x.shape[-2:]), strict=True):
                start = (first + j) * xw.shape[0]
                got[j][name] = xw[(-start) % step :: step]
            complete()

        return pre

    hs = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hs += [layer.get_submodule(n).register_forward_pre_hook(row_hook(n)) for n in row_names]
    batches = []  # (the batch's window indices in `hidden`, the batch)
    for k0, batch in _batches(hidden):
        sel = [j for j in range(batch.shape[0]) if _selected(first + k0 + j, select)]
        if len(sel) == batch.shape[0]:
            batches.append(([k0 + j for j in sel], batch))
        elif sel:
            batches.append(([k0 + j for j in sel], batch[sel]))
    try:
        for _, batch in batches:
            fired.clear()
            with forward_autocast(batch):
                try:
                    layer(batch, *call.args, **call.kwargs)
                except _Stop:
                    pass
            done[0] += 1
    finally:
        for h in hs:
            h.remove()

    # the blocks' arguments in the search's dtype, converted once (not per candidate)
    calls = [[_search_dtype(c, forward_dtype(b)) for c, (_, b) in zip(cs, batches, strict=True)]
             for cs in calls]  # fmt: skip

    def run(i: int, k: int) -> torch.Tensor:  # block i on shard batch k, as the search runs it
        a, kw = calls[i][k]
        with forward_autocast(batches[k][1]):
            return _first(blocks[i](*a, **kw))

    # the float output the candidates are compared with, computed by the same call
    reference = [[run(i, k).to(torch.float32) for k in range(len(batches))]
                 for i in range(len(searches))]  # fmt: skip
    nums = [[[0.0] * len(c) for _, _, c in searches] for _ in hidden]
    counts = [[0] * len(searches) for _ in hidden]
    # the candidates' weights in the dtype the autocast forward reads them in, converted once
    # (autocast's own cast of a float32 weight rounds the same way, once per call)
    wdtype = forward_dtype(batches[0][1]) if batches else None
    for i, (_, names, candidates) in enumerate(searches):
        lins = [layer.get_submodule(n) for n in names]
        originals = [lin.weight.data for lin in lins]
        try:
            for c, weights in enumerate(candidates):
                for lin, w in zip(lins, weights, strict=True):
                    lin.weight.data = w if wdtype is None else w.to(wdtype)
                for k, ((idx, _), r) in enumerate(zip(batches, reference[i], strict=True)):
                    for w, v in zip(idx, squared_errors(run(i, k), r), strict=True):
                        nums[w][i][c] = v
                        counts[w][i] = r[0].numel()
        finally:
            for lin, w0 in zip(lins, originals, strict=True):
                lin.weight.data = w0
    return [(n, m, r) for n, m, r in zip(nums, counts, got, strict=True)]


def _selected(window: int, select: tuple[int, bool] | None) -> bool:
    if select is None:
        return True
    stride, multiples = select
    return (window % stride == 0) == multiples


def squared_errors(out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per window (the first dimension), the sum of (out - ref)^2 (float32 `ref`): one float32
    pass for the difference and its square, summed in float32 by torch's cascade sum (a sum of
    non-negative terms: relative error about log2(n) float32 units, 1e-6 at 300k terms, where
    the float64 sum it replaces took twice the time). `out` is widened first: the same float32
    difference as torch's mixed-dtype `sub`, whose promoting loop took 3x as long."""
    d = out.to(torch.float32).sub_(ref).reshape(ref.shape[0], -1)
    return d.mul_(d).sum(1).tolist()


def mean_abs_inputs(
    per_window: list[dict[str, tuple[torch.Tensor, int, Any]]], names: list[str]
) -> dict[str, torch.Tensor]:
    """{Linear name: mean over the calibration tokens of |x| at its input} (float32), from the
    per-window float64 sums of `window_inputs` added in window order."""
    out = {}
    for name in names:
        total = per_window[0][name][0].clone()
        count = per_window[0][name][1]
        for got in per_window[1:]:
            total += got[name][0]
            count += got[name][1]
        out[name] = (total / max(count, 1)).to(torch.float32)
    return out
