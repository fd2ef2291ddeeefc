"""GPTQ within a decoder layer group by group: true-sequential and asymmetric calibration.

`layerwise.gptq_layer` solves all of a layer's Linears on the Hessians of the float layer's
inputs (the capture's statistics). Here the groups of Linears sharing an input are solved in
forward order (q/k/v, then o, gate/up, down), and before each group its statistics are computed
again by running the layer as it is now, the groups before it already quantized
(`GPTQConfig.true_sequential`), and/or against the float model's own inputs of the Linear
(`GPTQConfig.asym_alpha`, GPTAQ): a float copy of each layer runs on the float model's hidden
states (`FloatStream`, carried from layer to layer), and D = 2/n sum (x_fp - x) x^T is summed
next to H = 2/n sum x x^T, shard by shard as the capture sums (`calib.capture.shard_batches`).

The statistics are per-shard results (`shard_moments`, one entry per shard batch) added in shard
order, through the windows' `map_pair` (`calib.LocalWindows` here, the Ray runner's `RayWindows`
on a cluster: one task per shard, the float stream's shard next to the quantized one), and the
float stream moves on through the windows' `outputs` (on a cluster its shards stay in the object
store, and a resumable conversion journals them with the layer): the same bits either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..calib import InputStats
from ..calib.capture import (
    LocalWindows,
    _first,
    _Stop,
    collect_stats,
    forward_autocast,
    gram,
    layer_outputs,
    shard_batches,
)
from . import gptq_onepass
from .gptq import GPTQConfig
from .layerwise import LocalRunner, SolveJob, gptq_layer, swap_in


class FloatStream:
    """The float model's hidden states entering the current layer, in the windows' own form
    (`windows.stream`: a list of [1, L, d] tensors here, of shard references on a cluster; None:
    the same as the quantized model's, as at the first layer)."""

    def __init__(self) -> None:
        self.hidden: Any = None


def _inputs(layer: nn.Module, call: Any, batch: torch.Tensor, name: str) -> torch.Tensor:
    """The input rows [tokens, d] of Linear `name` when `layer` runs on `batch` (stopped there),
    in the dtype they reach it (bf16 where the bf16 forward made them so: `calib.gram` takes
    them as the capture does)."""
    got: list[torch.Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        got.append(args[0].detach().reshape(-1, args[0].shape[-1]))  # float32 or bf16
        raise _Stop

    h = layer.get_submodule(name).register_forward_pre_hook(pre)
    try:
        with forward_autocast(batch):  # the capture's precision, so untouched layers match it
            _first(layer(batch, *call.args, **call.kwargs))
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


Moments = tuple[torch.Tensor, torch.Tensor | None, int]


def shard_moments(
    layer: nn.Module,
    fp_layer: nn.Module | None,
    call: Any,
    hidden: list[torch.Tensor],
    fp_hidden: list[torch.Tensor] | None,
    name: str,
) -> list[Moments]:
    """Per shard batch of the windows `hidden` (`shard_batches`): (float64 sum x^T x, float64
    sum (x_fp - x)^T x or None, tokens) at the input of Linear `name`, x from `layer` on
    `hidden`, x_fp from `fp_layer` on the same windows' `fp_hidden`; float32 products. A Ray
    task gets one shard, hence one entry: the entries in shard order are the same either way."""
    out: list[Moments] = []
    fp_batches = shard_batches(fp_hidden) if fp_layer is not None and fp_hidden else None
    for batch in shard_batches(hidden):
        x = _inputs(layer, call, batch, name)
        with torch.autocast(x.device.type, enabled=False):  # float32 sums, as the capture's
            prod = gram(x).to(torch.float64)  # by x's dtype, as the capture's
        x = x.to(torch.float32)
        cross = None
        if fp_batches is not None:
            assert fp_layer is not None
            xf = _inputs(fp_layer, call, next(fp_batches), name).to(torch.float32)
            with torch.autocast(x.device.type, enabled=False):
                cross = ((xf - x).T @ x).to(torch.float64)
        out.append((prod, cross, int(x.shape[0])))
    return out


def group_moments(
    windows: Any,
    layer: nn.Module,
    name: str,
    fp_layer: nn.Module | None = None,
    fp_hidden: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H = 2/n sum x x^T, D = 2/n sum (x_fp - x) x^T or None) at the input of Linear `name`
    over the calibration `windows` (`shard_moments` per shard, summed in shard order)."""
    h_sum: torch.Tensor | None = None
    d_sum: torch.Tensor | None = None
    n = 0
    for prod, cross, tokens in windows.map_pair(layer, fp_layer, fp_hidden, shard_moments, name):
        h_sum = prod if h_sum is None else h_sum + prod
        n += tokens
        if cross is not None:
            d_sum = cross if d_sum is None else d_sum + cross
    assert h_sum is not None
    scale = 2.0 / max(n, 1)
    return h_sum * scale, (d_sum * scale if d_sum is not None else None)


def sequential_gptq_layer(
    where: str,
    layer: nn.Module,
    stats: InputStats,
    qtype_for: Callable[[str, nn.Linear], str | None],
    config: GPTQConfig,
    options: dict[str, Any],
    plan: dict[str, str | None],
    solve: Callable[[list[SolveJob]], list[Any]],
    stream: FloatStream,
) -> dict[str, nn.Module]:
    """`layerwise.gptq_layer` with true-sequential and/or asymmetric statistics (see the module
    docstring); `stream` holds the float model's hidden states and is moved past this layer."""
    windows = stats.windows
    asym = config.asym_alpha > 0
    fp_layer = copy.deepcopy(layer) if asym else None
    fp_hidden = (stream.hidden if stream.hidden is not None else windows.stream) if asym else None
    groups = [names for names, _, _ in stats.groups()]
    new: dict[str, nn.Module] = {}
    if config.true_sequential:
        for k, names in enumerate(groups):
            if k == 0 and not asym:
                h, d = next(h for nm, h, _ in stats.groups() if nm == names), None
            else:
                h, d = group_moments(windows, layer, names[0], fp_layer, fp_hidden)
            one = [(names, h, d)]
            new.update(gptq_layer(where, stats, qtype_for, config, options, plan, solve,
                                  groups=one, rest=False))  # fmt: skip
        new.update(gptq_layer(where, stats, qtype_for, config, options, plan, solve, groups=[]))
    else:
        todo = []
        for names, h, _ in stats.groups():
            _, d = group_moments(windows, layer, names[0], fp_layer, fp_hidden)
            todo.append((names, h, d))
        new.update(gptq_layer(where, stats, qtype_for, config, options, plan, solve, groups=todo))
    if fp_layer is not None and fp_hidden is not None:
        stream.hidden = windows.outputs(fp_layer, fp_hidden, where)
    return new


def multi_pass_layer(
    where: str,
    layer: nn.Module,
    call: Any,
    batch: torch.Tensor,
    fp_batch: torch.Tensor | None,
    qtype_for: Callable[[str, nn.Linear], str | None],
    config: GPTQConfig,
    options: dict[str, Any],
    plan: dict[str, str | None],
) -> gptq_onepass.LayerResult:
    """`sequential_gptq_layer` and the layer's outputs on one shard's windows `batch` [n, L,
    d]: `gptq_onepass`'s fallback, in its form (QuantLinears by name, outputs, float outputs)."""
    hidden = list(batch.split(1))
    stats = collect_stats(layer, call, hidden, where)
    stats.windows = LocalWindows(call, hidden)
    stream = FloatStream()
    stream.hidden = list(fp_batch.split(1)) if fp_batch is not None else None
    new = sequential_gptq_layer(where, layer, stats, qtype_for, config, options, plan,
                                LocalRunner().solve, stream)  # fmt: skip
    out = torch.cat(layer_outputs(layer, call, hidden, where))
    return new, out, (torch.cat(stream.hidden) if fp_batch is not None else None)


def sequential_gptq_model(
    model: nn.Module,
    qtype_for: Callable[[str, nn.Linear], str | None],
    ids: torch.Tensor,
    config: GPTQConfig,
    options: dict[str, Any],
    *,
    progress: bool = True,
    runner: Any = None,
) -> dict[str, str | None]:
    """`layerwise.gptq_model` with `config.true_sequential` / `config.asym_alpha`. Returns
    {module name: qtype}. `runner`: where the layers and solves run (default `LocalRunner()`;
    the float stream is its `carry`, which a cluster runner journals with each layer).
    True-sequential windows of one shard here take one forward pass a layer instead
    (`gptq_onepass`: the same bytes)."""
    if config.true_sequential and gptq_onepass.applies(ids, runner):
        return gptq_onepass.one_pass_gptq_model(
            model, qtype_for, ids, config, options, multi_pass_layer, progress=progress
        )
    plan: dict[str, str | None] = {}
    runner = runner or LocalRunner()
    stream = FloatStream()

    def process(i: int, where: str, layer: nn.Module, stats: InputStats) -> Callable[[], None]:
        new = sequential_gptq_layer(
            where, layer, stats, qtype_for, config, options, plan, runner.solve, stream
        )
        return lambda: swap_in(layer, new)

    carry = stream if config.asym_alpha > 0 else None
    runner.run_layers(model, ids, process, progress=progress, desc="gptq", carry=carry)
    return plan
