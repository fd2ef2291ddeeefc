"""AWQ applied to a whole model, layer by layer, on the shared capture (`calib.run_layers`):
for each decoder layer, the scale search and fold on each standard pair, then the clip search,
then the layer's Linears are quantized (round to nearest, or GPTQ for "awq+gptq" on the
Hessians of the scaled inputs); the next layer's inputs come from this layer's float weights
(`AWQConfig.float_inputs`, AutoAWQ's pipeline: "awq"'s default) or from the quantized layer
("awq+gptq"'s default).

The pairs use the Llama family's module names (Llama, Mistral, Qwen2, Gemma, SmolLM):
input_layernorm -> self_attn.{q,k,v}_proj (block: self_attn), self_attn.v_proj ->
self_attn.o_proj (only when v's outputs are o's inputs: not under grouped-query attention with
fewer key/value heads than heads, e.g. SmolLM2-135M's 3 vs 9, unless `AWQConfig.gqa_vo`),
post_attention_layernorm ->
mlp.{gate,up}_proj (block: mlp), mlp.up_proj -> mlp.down_proj. A pair whose modules are
missing is skipped (its Linears are still clipped and quantized).

x_mean comes from the capture's per-shard |x| sums (`InputStats.mean_abs`), the clip search's
grams from its Hessian sums (`clip_tokens=0`) or from strided input rows. The searches see the
calibration windows only through `stats.windows.map` (`awq_windows`: per-window results, each
candidate's squared output error and the strided rows), added in window order here, so
`ferroquant.distributed` can compute them per shard on a cluster and get the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..calib import InputStats
from ..calib.capture import forward_dtype
from ..nn import QuantLinear
from ..tensor import QuantizeError
from .awq import (
    AWQConfig,
    HeadTie,
    ScaleResult,
    apply_clip,
    candidate_weights,
    fold_scale,
    format_qdq,
    group_size,
    hessian_grams,
    pick_scale,
    scale_candidates,
    search_clip,
    weight_mean,
)
from .awq_windows import mean_abs_inputs, window_inputs, window_losses
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


def pair_candidates(
    layer: nn.Module,
    names: tuple[str, ...],
    qs: list[str | None],
    config: AWQConfig,
    options: dict[str, Any],
    x_mean: torch.Tensor,
    tie: HeadTie | None = None,
) -> tuple[list[tuple[float | None, torch.Tensor]], list[torch.Tensor], list[list[torch.Tensor]]]:
    """(the scale candidates, the Linears' float weights, each candidate's weights
    qdq(W s) / s) of one pair, from its unfolded weights and inputs' `x_mean`. `tie`: the
    candidates are computed on the tied channels' averaged statistics and expanded."""
    lins = [layer.get_submodule(n) for n in names]
    first_q = next(q for q in qs if q is not None)
    qdqs = [format_qdq(q, format_options(q, options) if q else None) for q in qs]
    originals = [lin.weight.data.clone() for lin in lins]
    w_mean = weight_mean(originals, group_size(first_q, lins[0].in_features))
    if tie is not None:
        x_mean, w_mean = tie.reduce(x_mean), tie.reduce(w_mean)
    cands = scale_candidates(x_mean, w_mean, config.grid, config.duo_scaling, config.identity)
    if tie is not None:
        cands = [(r, tie.expand(s)) for r, s in cands]
    return cands, originals, candidate_weights(cands, originals, qdqs)


def search_pairs(
    layer: nn.Module,
    windows: Any,
    pairs: list[tuple[tuple[str, ...], str, list[str | None], torch.Tensor | None]],
    config: AWQConfig,
    options: dict[str, Any],
    x_means: dict[str, torch.Tensor],
    ties: dict[str, HeadTie] | None = None,
    rows: tuple[list[str], int] | None = None,
) -> tuple[list[ScaleResult], list[dict[str, torch.Tensor]] | None]:
    """AWQ's scale search for a layer's pairs (Linear names, block name, their qtypes, their
    inputs' mean x x^T or None) over the calibration `windows` (`calib.LocalWindows` or a
    cluster's), every pair on the unfolded layer (AutoAWQ searches them all before applying
    any scale): every candidate's loss (and `x_means`, from `window_inputs`) are per-window
    results added in window order, so they are the same bits wherever the windows ran. A
    block that is the pair's one Linear (o_proj, down_proj) with its inputs' `gram` given (the
    capture's Hessian sums, also added in window order) has each candidate's loss from the gram
    (`linear_output_mse`) instead of a forward pass per candidate; the others' candidates run
    in one `window_losses` pass, which also takes the strided input `rows` (returned per
    window; None when no pair needed a forward pass)."""
    ties = ties or {}
    built = [pair_candidates(layer, n, qs, config, options, x_means[n[0]], ties.get(n[0]))
             for n, _, qs, _ in pairs]  # fmt: skip
    losses: list[list[float] | None] = [None] * len(pairs)
    searches, where = [], []
    for i, ((names, block_name, _, gram), (_, originals, weights)) in enumerate(
        zip(pairs, built, strict=True)
    ):
        if gram is not None and names == (block_name,):
            # the errors in place of the candidates' weights (only their losses are used)
            losses[i] = linear_output_mses([w[0].sub_(originals[0]) for w in weights], gram)
        else:
            searches.append((block_name, list(names), weights))
            where.append(i)
    got = None
    if searches:
        found, got = block_losses(layer, windows, searches, config, rows)
        for j, lo in enumerate(found):
            losses[where[j]] = lo
    picks = [pick_scale(cands, lo) for (cands, _, _), lo in zip(built, losses, strict=True)]  # type: ignore[arg-type]
    return picks, got


def _totals(per_window: list, j: int, n_c: int) -> list[float]:
    """Search j's loss of each of its n_c candidates: the per-window sums added in window order
    over the element counts."""
    den = sum(p[1][j] for p in per_window)
    return [sum(p[0][j][c] for p in per_window) / max(den, 1) for c in range(n_c)]


def block_losses(
    layer: nn.Module,
    windows: Any,
    searches: list[tuple[str, list[str], list[list[torch.Tensor]]]],
    config: AWQConfig,
    rows: tuple[list[str], int] | None = None,
) -> tuple[list[list[float]], list[dict[str, torch.Tensor]]]:
    """Each search's candidates' block-output losses (`window_losses`) over every calibration
    window, and per window the strided input `rows` of `window_losses` (every window runs in
    exactly one of the passes: its rows come from that one). With `config.screen_stride` = k
    > 1 (and more candidates than `screen_keep` + 1), every candidate first runs on every k-th
    window only (the screen); the `screen_keep` least of those losses and s = 1 (the first
    candidate) then run on the other windows as well, and
    their losses are over all windows (the same sums as without the screen); the others' are
    inf (not scored in full). So the pick is the least full loss among the finalists, never
    above s = 1's: the full search's pick whenever that is among the screen's best
    `screen_keep`, at about (1/k + (keep + 1)/n) of its block forwards for n candidates.
    An attention block's search keeps `screen_keep_attention`."""
    config = config.resolved()
    stride = config.screen_stride
    assert stride is not None and config.screen_keep_attention is not None  # resolved
    keeps = [config.screen_keep_attention if b.endswith("self_attn") else config.screen_keep
             for b, _, _ in searches]  # fmt: skip
    n_cs = [len(c) for _, _, c in searches]
    if stride <= 1 or all(n <= k + 1 for n, k in zip(n_cs, keeps, strict=True)):
        per_window = windows.map(layer, window_losses, searches, None, rows)
        return [_totals(per_window, j, n) for j, n in enumerate(n_cs)], [p[2] for p in per_window]
    first = windows.map(layer, window_losses, searches, (stride, True), rows)
    screen = [_totals(first, j, n) for j, n in enumerate(n_cs)]
    finalists = [sorted({0, *sorted(range(n), key=lo.__getitem__)[:keep]})
                 for n, lo, keep in zip(n_cs, screen, keeps, strict=True)]  # fmt: skip
    rest = [(b, names, [c[k] for k in fin])
            for (b, names, c), fin in zip(searches, finalists, strict=True)]  # fmt: skip
    second = windows.map(layer, window_losses, rest, (stride, False), rows)
    out = []
    for j, (n, fin) in enumerate(zip(n_cs, finalists, strict=True)):
        merged = []  # per window, in window order: the finalists' sums from the pass that ran it
        for w, ((nums1, m1, _), (nums2, m2, _)) in enumerate(zip(first, second, strict=True)):
            if w % stride == 0:
                merged.append(([[nums1[j][k] for k in fin]], [m1[j]]))
            else:
                merged.append(([nums2[j]], [m2[j]]))
        full = _totals(merged, 0, len(fin))
        lo = [math.inf] * n
        for k, v in zip(fin, full, strict=True):
            lo[k] = v
        out.append(lo)
    got = [(a if w % stride == 0 else b)[2]
           for w, (a, b) in enumerate(zip(first, second, strict=True))]  # fmt: skip
    return out, got


def linear_output_mse(d: torch.Tensor, gram: torch.Tensor) -> float:
    """The mean over tokens and outputs of (d x)^2 for a weight error d [rows, cols], from the
    inputs' mean x x^T `gram` [cols, cols] (float32): tr(d G d^T) / rows, the loss the block
    forward would measure for a block that is this one Linear, in float32 instead of through
    the forward's bf16 rounding, and rows x cols^2 instead of rows x cols x tokens of work."""
    d = d.to(torch.float32)
    return float((d @ gram * d).sum(dtype=torch.float64)) / max(d.shape[0], 1)


# the bf16 screen of `linear_output_mses`: candidates whose bf16 loss is within this fraction of
# the least are rescored in float32 (on SmolLM2 int4_g64's 30 down pairs x 21 candidates, full
# model, awq's defaults (float inputs): the bf16 scores' relative error was 5.6e-5 median,
# 2.7e-3 at the 99th percentile, 7.3e-3 at most; float32's pick was bf16's least in 30 of 30
# (float32's best and second best 2.4e-4 apart at the least), so every margin from 2^-3 to
# 2^-13 kept it; 2^-9 rescores 47 of the 630 candidates, 2^-6 151; session 15's sequential
# inputs: 30 of 30 down to 2^-9 as well)
SCREEN_MARGIN = 2.0**-9


def linear_output_mses(ds: list[torch.Tensor], gram: torch.Tensor) -> list[float]:
    """`linear_output_mse` of each weight error in `ds` on one `gram`, the search's candidates:
    where the CPU has native bf16 products (`forward_dtype`), every candidate is first scored
    on bf16 operands (one bf16 GEMM, d @ G, a quarter of the float32 one's time on AMX) and the
    ones within `SCREEN_MARGIN` of the least are rescored in float32, so the least loss (the
    pick) is float32's unless a bf16 score is off by more than about half the margin. The
    others keep their bf16 scores."""
    if len(ds) < 2 or forward_dtype(gram) is None:
        return [linear_output_mse(d, gram) for d in ds]
    gb = gram.to(torch.bfloat16)
    approx = []
    for d in ds:
        d = d.to(torch.float32)
        # t widened first: torch.mul(t, d)'s float32 products, without its mixed-dtype loop
        t = torch.mm(d.to(torch.bfloat16), gb).to(torch.float32)
        approx.append(float(t.mul_(d).sum()) / max(d.shape[0], 1))
    best = min(approx)
    cut = best + SCREEN_MARGIN * abs(best)
    return [linear_output_mse(d, gram) if a <= cut else a for d, a in zip(ds, approx, strict=True)]


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
    config = config.resolved()
    windows = stats.windows
    if windows is None:
        raise QuantizeError("awq needs the capture's calibration windows")
    todo = []
    ties: dict[str, HeadTie] = {}
    for prev_name, names, block_name in PAIRS:
        prev, block = _get(layer, prev_name), _get(layer, block_name)
        lins = [_get(layer, n) for n in names]
        if prev is None or block is None or not all(isinstance(m, nn.Linear) for m in lins):
            continue
        tie = None
        if isinstance(prev, nn.Linear) and prev.out_features != lins[0].in_features:
            tie = _head_tie(layer, prev, lins[0]) if config.gqa_vo else None
            if tie is None:
                continue  # v -> o under grouped-query attention
        qs = [qtype_for(f"{where}.{n}", m) for n, m in zip(names, lins, strict=True)]
        if all(q is None for q in qs):
            continue
        todo.append((prev_name, prev, names, block_name, lins, qs))
        if tie is not None:
            ties[names[0]] = tie
    clip = {}
    if config.clip:
        clip = {
            n: m
            for n, m in stats.linears.items()
            if not n.endswith(NO_CLIP) and qtype_for(f"{where}.{n}", m) is not None
        }
    # clip_tokens 0: the clip search's grams from the capture's x^T x (no rows to collect)
    rows = [] if config.clip_tokens <= 0 else [n for n in clip if n in stats.group_of]
    step = max(1, sum(windows.tokens) // max(config.clip_tokens, 1))
    firsts = [t[2][0] for t in todo]
    # x_mean from the capture's |x| sums where it has them (the same sums per shard: no pass
    # of the layer here), else from `window_inputs`' per-window sums (with the clip rows)
    known = {n: stats.mean_abs(n) for n in firsts}
    need = [n for n, m in known.items() if m is None]
    x_means: dict[str, torch.Tensor] = {}
    row_of = None  # per window, {Linear: its strided input rows}
    if need:
        per_window = windows.map(layer, window_inputs, need, rows, step, where)
        x_means = mean_abs_inputs(per_window, need)
        row_of = [{n: v[2] for n, v in got.items() if v[2] is not None} for got in per_window]
    x_means.update({n: m for n, m in known.items() if m is not None})
    pairs = []
    for _prev_name, _prev, names, block_name, _lins, qs in todo:
        g = stats.group_of.get(names[0])
        gram = None
        if g is not None and stats.counts[g]:
            gram = (stats.sums[g] / stats.counts[g]).to(torch.float32)
        pairs.append((names, block_name, qs, gram))
    # the block searches' passes take the clip rows too (no pass of the layer of their own)
    want = (rows, step) if rows and row_of is None else None
    results, got_rows = search_pairs(layer, windows, pairs, config, options, x_means, ties,
                                     want) if pairs else ([], None)  # fmt: skip
    if want is not None:
        row_of = got_rows
        if row_of is None:  # no pair ran a forward pass: one pass for the rows
            per_window = windows.map(layer, window_inputs, [], rows, step, where)
            row_of = [{n: v[2] for n, v in got.items()} for got in per_window]
    scale_of: dict[str, torch.Tensor] = {}
    for (prev_name, prev, names, _block_name, lins, _qs), res in zip(todo, results, strict=True):
        tie = ties.get(names[0])
        fold_scale(prev, lins, res.scale, None if tie is None else tie.first(res.scale))
        for n in names:
            scale_of[n] = res.scale
        g = stats.group_of.get(names[0])
        if g is not None:  # the Hessian of x / s
            inv = (1.0 / res.scale).to(torch.float64)
            stats.sums[g] *= inv[:, None] * inv[None, :]
        if report is not None:
            report[f"{where}.{prev_name}"] = res
    for n, lin in clip.items():
        q = qtype_for(f"{where}.{n}", lin)
        group = group_size(q, lin.in_features)
        x, grams = None, None
        if n not in stats.group_of:  # never called in the forward pass: nothing to clip for
            continue
        if rows:
            x = torch.cat([got[n] for got in row_of or [] if n in got])
            if n in scale_of:  # the folded Linear's input is x / s
                x = x / scale_of[n]
        else:  # the Hessian sums are already those of x / s (rescaled above)
            g = stats.group_of[n]
            grams = hessian_grams(stats.sums[g], stats.counts[g], group)
        best, _ = search_clip(
            lin.weight.data,
            x,
            format_qdq(q, format_options(q, options)),
            group,
            clip_grid=config.clip_grid,
            max_shrink=config.max_shrink,
            grams=grams,
        )
        apply_clip(lin, best)


def _head_tie(layer: nn.Module, v: nn.Linear, o: nn.Linear) -> HeadTie | None:
    """The v -> o channel tie of grouped-query attention (None: not that shape)."""
    hd = getattr(_get(layer, "self_attn"), "head_dim", None)
    if not isinstance(hd, int) or hd <= 0 or v.out_features % hd or o.in_features % v.out_features:
        return None
    return HeadTie(v.out_features // hd, o.in_features // v.out_features, hd)


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
    config = config.resolved()

    def process(i: int, where: str, layer: nn.Module, stats: InputStats) -> Callable[[], None]:
        # float_inputs: the layer's float parameters, put back while the runner computes its
        # outputs (the next layer's inputs), then the scaled and quantized ones again
        floats = {n: p.data.clone() for n, p in layer.named_parameters()} if (
            config.float_inputs) else None  # fmt: skip
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
        if floats is None:
            return lambda: swap_in(layer, new)
        params = dict(layer.named_parameters())
        done = {n: p.data for n, p in params.items()}
        for n, p in params.items():
            p.data = floats[n]

        def finish() -> None:
            for n, p in params.items():
                p.data = done[n]
            swap_in(layer, new)

        return finish

    runner.run_layers(model, ids, process, progress=progress, desc="awq+gptq" if gptq else "awq")
    return plan
