"""AWQ applied to a whole model, layer by layer, on the shared capture (`calib.run_layers`):
for each decoder layer, the scale search and fold on each standard pair, then the clip search,
then the layer's Linears are quantized (round to nearest, or GPTQ for "awq+gptq" on the
Hessians of the scaled inputs); the next layer's inputs come from this quantized layer.

The pairs use the Llama family's module names (Llama, Mistral, Qwen2, Gemma, SmolLM):
input_layernorm -> self_attn.{q,k,v}_proj (block: self_attn), self_attn.v_proj ->
self_attn.o_proj (only when v's outputs are o's inputs: not under grouped-query attention with
fewer key/value heads than heads, e.g. SmolLM2-135M's 3 vs 9), post_attention_layernorm ->
mlp.{gate,up}_proj (block: mlp), mlp.up_proj -> mlp.down_proj. A pair whose modules are
missing is skipped (its Linears are still clipped and quantized).

The searches see the calibration windows only through `stats.windows.map` (per-window results:
float64 sums of |x| for x_mean, each candidate's squared output error, the clip search's
strided input rows), added in window order here, so `ferroquant.distributed` can compute them
per shard on a cluster and get the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..calib import InputStats
from ..calib.capture import forward_autocast, shard_batches
from ..nn import QuantLinear
from ..tensor import QuantizeError
from .awq import (
    AWQConfig,
    ScaleResult,
    apply_clip,
    candidate_weights,
    fold_scale,
    format_qdq,
    group_size,
    pick_scale,
    scale_candidates,
    search_clip,
    weight_mean,
)
from .gptq import GPTQConfig
from .layerwise import LocalRunner, format_options, gptq_layer, swap_in

# (previous op, Linears fed by its output, the block whose output is the loss)
PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
NO_CLIP = ("q_proj", "k_proj")  # their errors go through the softmax (AutoAWQ skips them)


def _get(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# -- per-window pieces: run here on all windows, or per shard on a Ray cluster ------------------


def _batches(hidden: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of its first window, batch) for each of the capture's shard batches of `hidden`
    (`calib.capture.shard_batches`: the same batches on one machine and in a Ray task's shard)."""
    k = 0
    for batch in shard_batches(hidden):
        yield k, batch
        k += batch.shape[0]


def window_abs_sums(
    layer: nn.Module, call: Any, hidden: list[torch.Tensor], first: int, names: list[str],
    where: str,
) -> list[dict[str, tuple[torch.Tensor, int]]]:  # fmt: skip
    """Per window: for each Linear of `names`, the float64 sum over the window's tokens of |x|
    at its input, and the number of tokens (AWQ's x_mean, added in window order). One pass of
    the layer (a shard batch at a time, in the capture's precision, `forward_autocast`) serves
    every pair of the layer, as AutoAWQ captures a layer's inputs once before any scaling: a
    fold keeps the float function, so the later pairs' inputs do not change."""
    got: list[dict[str, tuple[torch.Tensor, int]]] = [{} for _ in hidden]
    at = [0]

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float32)
            if not bool(torch.isfinite(x).all()):
                raise QuantizeError(f"awq: non-finite activations at the input of {where}.{name}")
            for j, xw in enumerate(x.reshape(-1, *x.shape[-2:])):  # one [L, d] per window
                got[at[0] + j][name] = (xw.abs().sum(0, dtype=torch.float64), xw.shape[0])

        return pre

    hs = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for k0, batch in _batches(hidden):
            at[0] = k0
            with forward_autocast(batch):
                layer(batch, *call.args, **call.kwargs)
    finally:
        for h in hs:
            h.remove()
    return got


def window_losses(
    layer: nn.Module,
    call: Any,
    hidden: list[torch.Tensor],
    first: int,
    block_name: str,
    names: list[str],
    candidates: list[list[torch.Tensor]],
) -> list[tuple[list[float], int]]:
    """Per window: for each candidate (the weights of the Linears `names`), the float64 sum of
    squared differences between the block's output with those weights and its float output;
    and the output's element count (a candidate's loss: the sums added in window order over the
    counts). The block runs once per candidate and shard batch (not per window), in the
    capture's precision (`forward_autocast`); the per-window sums are taken from the batch's
    rows."""
    block = layer.get_submodule(block_name)
    lins = [layer.get_submodule(n) for n in names]
    calls: list[tuple[tuple, dict]] = []
    reference: list[torch.Tensor] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, dict(kwargs)))

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        reference.append(_first(out).detach().to(torch.float32))

    hs = [block.register_forward_pre_hook(pre, with_kwargs=True),
          block.register_forward_hook(post, with_kwargs=True)]  # fmt: skip
    batches = list(_batches(hidden))
    try:
        for _, batch in batches:
            with forward_autocast(batch):
                layer(batch, *call.args, **call.kwargs)
    finally:
        for h in hs:
            h.remove()
    nums = [[0.0] * len(candidates) for _ in hidden]
    counts = [0] * len(hidden)
    originals = [lin.weight.data for lin in lins]
    try:
        for c, weights in enumerate(candidates):
            for lin, w in zip(lins, weights, strict=True):
                lin.weight.data = w
            for (k0, batch), (a, kw), r in zip(batches, calls, reference, strict=True):
                with forward_autocast(batch):
                    o = _first(block(*a, **kw))
                d = (o.to(torch.float32) - r).reshape(batch.shape[0], -1)
                for j, row in enumerate(d):  # per window, in window order
                    nums[k0 + j][c] = float(row.pow(2).sum(dtype=torch.float64))
                    counts[k0 + j] = row.numel()
    finally:
        for lin, w0 in zip(lins, originals, strict=True):
            lin.weight.data = w0
    return [(n, m) for n, m in zip(nums, counts, strict=True)]


def window_strided_inputs(
    layer: nn.Module, call: Any, hidden: list[torch.Tensor], first: int, names: list[str],
    step: int,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Per window: the input rows of each Linear `names` whose index among all windows' tokens
    (windows of equal length, `first` the window's index) is a multiple of `step`."""
    got: list[dict[str, torch.Tensor]] = [{} for _ in hidden]
    at = [0]

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float32)
            for j, xw in enumerate(x.reshape(-1, *x.shape[-2:])):  # one [L, d] per window
                start = (first + at[0] + j) * xw.shape[0]
                got[at[0] + j][name] = xw[(-start) % step :: step]

        return pre

    hs = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for k0, batch in _batches(hidden):
            at[0] = k0
            with forward_autocast(batch):
                layer(batch, *call.args, **call.kwargs)
    finally:
        for h in hs:
            h.remove()
    return got


def mean_abs_inputs(
    layer: nn.Module, windows: Any, names: list[str], where: str
) -> dict[str, torch.Tensor]:
    """{Linear name: mean over the calibration tokens of |x| at its input} (float32), from the
    per-window float64 sums of `window_abs_sums` added in window order."""
    if not names:
        return {}
    per_window = windows.map(layer, window_abs_sums, names, where)
    out = {}
    for name in names:
        total = per_window[0][name][0].clone()
        count = per_window[0][name][1]
        for got in per_window[1:]:
            total += got[name][0]
            count += got[name][1]
        out[name] = (total / max(count, 1)).to(torch.float32)
    return out


def search_pair(
    layer: nn.Module,
    windows: Any,
    where: str,
    names: tuple[str, ...],
    block_name: str,
    qs: list[str | None],
    config: AWQConfig,
    options: dict[str, Any],
    x_mean: torch.Tensor,
    gram: torch.Tensor | None = None,
) -> ScaleResult:
    """AWQ's scale search for one pair over the calibration `windows` (`calib.LocalWindows` or
    a cluster's): every candidate's loss (and `x_mean`, `mean_abs_inputs`) are per-window
    results added in window order, so they are the same bits wherever the windows ran. A block
    that is the pair's one Linear (o_proj, down_proj) with its inputs' mean x x^T `gram` given
    (the capture's Hessian sums, also added in window order) has each candidate's loss from
    the gram (`linear_output_mse`) instead of a forward pass per candidate."""
    lins = [layer.get_submodule(n) for n in names]
    first_q = next(q for q in qs if q is not None)
    qdqs = [format_qdq(q, format_options(q, options) if q else None) for q in qs]
    originals = [lin.weight.data.clone() for lin in lins]
    w_mean = weight_mean(originals, group_size(first_q, lins[0].in_features))
    cands = scale_candidates(x_mean, w_mean, config.grid, config.duo_scaling)
    weights = candidate_weights(cands, originals, qdqs)
    if gram is not None and names == (block_name,):
        losses = [linear_output_mse(w[0] - originals[0], gram) for w in weights]
        return pick_scale(cands, losses)
    per_window = windows.map(layer, window_losses, block_name, list(names), weights)
    den = sum(n for _, n in per_window)
    losses = [sum(nums[c] for nums, _ in per_window) / max(den, 1) for c in range(len(cands))]
    return pick_scale(cands, losses)


def linear_output_mse(d: torch.Tensor, gram: torch.Tensor) -> float:
    """The mean over tokens and outputs of (d x)^2 for a weight error d [rows, cols], from the
    inputs' mean x x^T `gram` [cols, cols] (float32): tr(d G d^T) / rows, the loss the block
    forward would measure for a block that is this one Linear, in float32 instead of through
    the forward's bf16 rounding, and rows x cols^2 instead of rows x cols x tokens of work."""
    d = d.to(torch.float32)
    return float((d @ gram * d).sum(dtype=torch.float64)) / max(d.shape[0], 1)


def awq_layer(
    where: str,
    layer: nn.Module,
    stats: InputStats,
    qtype_for: Callable[[str, nn.Linear], str | None],
    config: AWQConfig,
    options: dict[str, Any],
    report: dict[str, Any] | None = None,
) -> None:
    """Search, fold and clip one decoder layer in place (float weights; nothing quantized).
    `stats`' Hessians are rescaled to the scaled inputs. `report` gets {previous op's name:
    ScaleResult} for each searched pair."""
    windows = stats.windows
    if windows is None:
        raise QuantizeError("awq needs the capture's calibration windows")
    todo = []
    for prev_name, names, block_name in PAIRS:
        prev, block = _get(layer, prev_name), _get(layer, block_name)
        lins = [_get(layer, n) for n in names]
        if prev is None or block is None or not all(isinstance(m, nn.Linear) for m in lins):
            continue
        if isinstance(prev, nn.Linear) and prev.out_features != lins[0].in_features:
            continue  # v -> o under grouped-query attention
        qs = [qtype_for(f"{where}.{n}", m) for n, m in zip(names, lins, strict=True)]
        if all(q is None for q in qs):
            continue
        todo.append((prev_name, prev, names, block_name, lins, qs))
    x_means = mean_abs_inputs(layer, windows, [t[2][0] for t in todo], where)
    for prev_name, prev, names, block_name, lins, qs in todo:
        g = stats.group_of.get(names[0])
        gram = None
        if g is not None and stats.counts[g]:
            gram = (stats.sums[g] / stats.counts[g]).to(torch.float32)
        res = search_pair(
            layer, windows, where, names, block_name, qs, config, options, x_means[names[0]], gram
        )
        fold_scale(prev, lins, res.scale)
        if g is not None:  # the Hessian of x / s
            inv = (1.0 / res.scale).to(torch.float64)
            stats.sums[g] *= inv[:, None] * inv[None, :]
        if report is not None:
            report[f"{where}.{prev_name}"] = res
    if not config.clip:
        return
    clip = {
        n: m
        for n, m in stats.linears.items()
        if not n.endswith(NO_CLIP) and qtype_for(f"{where}.{n}", m) is not None
    }
    if not clip:
        return
    step = max(1, sum(windows.tokens) // config.clip_tokens)
    per_window = windows.map(layer, window_strided_inputs, list(clip), step)
    for n, lin in clip.items():
        x = torch.cat([got[n] for got in per_window if n in got])
        q = qtype_for(f"{where}.{n}", lin)
        best, _ = search_clip(
            lin.weight.data,
            x,
            format_qdq(q, format_options(q, options)),
            group_size(q, lin.in_features),
            clip_grid=config.clip_grid,
            max_shrink=config.max_shrink,
        )
        apply_clip(lin, best)


def awq_model(
    model: nn.Module,
    qtype_for: Callable[[str, nn.Linear], str | None],
    ids: torch.Tensor,
    config: AWQConfig,
    options: dict[str, Any],
    *,
    gptq: GPTQConfig | None = None,
    progress: bool = True,
    report: dict[str, Any] | None = None,
    runner: Any = None,
) -> dict[str, str | None]:
    """AWQ every decoder layer of `model` in place, then quantize its Linears (QuantLinear):
    round to nearest, or GPTQ with `gptq`. Returns {module name: qtype}. `runner`: where the
    layers, the searches' windows and the GPTQ solves run (default `LocalRunner()`)."""
    plan: dict[str, str | None] = {}
    runner = runner or LocalRunner()

    def process(i: int, where: str, layer: nn.Module, stats: InputStats) -> Callable[[], None]:
        # the search is many small forward passes: one torch thread (OpenMP's barriers made it
        # 20x slower on a busy 2-core machine, as they did GPTQ's column loop)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            awq_layer(where, layer, stats, qtype_for, config, options, report)
        finally:
            torch.set_num_threads(threads)
        if gptq is not None:
            new = gptq_layer(where, stats, qtype_for, gptq, options, plan, runner.solve)
        else:
            new = {}
            for nm, lin in stats.linears.items():
                q = plan[f"{where}.{nm}"] = qtype_for(f"{where}.{nm}", lin)
                if q is None:
                    continue
                opts = format_options(q, options)
                new[nm] = QuantLinear.from_linear(lin, q, **opts)
                lin.weight.data = format_qdq(q, opts)(lin.weight.data).to(lin.weight.dtype)
        return lambda: swap_in(layer, new)

    runner.run_layers(model, ids, process, progress=progress, desc="awq+gptq" if gptq else "awq")
    return plan
