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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calib import InputStats, run_layers
from ..nn import QuantLinear
from ..tensor import QuantizeError
from .awq import (
    AWQConfig,
    apply_clip,
    fold_scale,
    format_qdq,
    group_size,
    search_clip,
    search_scale,
)
from .gptq import GPTQConfig
from .layerwise import format_options, gptq_layer, swap_in

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


@dataclass
class BlockCapture:
    """The block's calls on every window (args, kwargs), its float outputs, and the tokens
    entering the paired Linears ([n_tokens, in])."""

    calls: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor]
    x: torch.Tensor


def capture_block(
    replay: Callable[[], None], block: nn.Module, first: nn.Linear, name: str
) -> BlockCapture:
    calls: list[tuple[tuple, dict]] = []
    outputs: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, dict(kwargs)))

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        outputs.append(_first(out).detach())

    def lin_pre(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise QuantizeError(f"awq: non-finite activations at the input of {name}")
        xs.append(x)

    hs = [
        block.register_forward_pre_hook(pre, with_kwargs=True),
        block.register_forward_hook(post, with_kwargs=True),
        first.register_forward_pre_hook(lin_pre),
    ]
    try:
        replay()
    finally:
        for h in hs:
            h.remove()
    return BlockCapture(calls, outputs, torch.cat(xs))


def capture_inputs(
    replay: Callable[[], None], linears: dict[str, nn.Linear], tokens: int
) -> dict[str, torch.Tensor]:
    """Each Linear's input tokens, evenly strided down to about `tokens` rows."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in linears}

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            got[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32))

        return pre

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        replay()
    finally:
        for h in hs:
            h.remove()
    out = {}
    for n, xs in got.items():
        if xs:
            x = torch.cat(xs)
            out[n] = x[:: max(1, x.shape[0] // tokens)]
    return out


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
    if stats.replay is None:
        raise QuantizeError("awq needs the capture's replay of the layer")
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
        cap = capture_block(stats.replay, block, lins[0], f"{where}.{names[0]}")
        first_q = next(q for q in qs if q is not None)
        res = search_scale(
            cap.x.abs().mean(0),
            lins,
            [format_qdq(q, format_options(q, options) if q else None) for q in qs],
            lambda cap=cap, block=block: [_first(block(*a, **k)) for a, k in cap.calls],
            cap.outputs,
            group=group_size(first_q, lins[0].in_features),
            grid=config.grid,
            duo_scaling=config.duo_scaling,
        )
        del cap
        fold_scale(prev, lins, res.scale)
        g = stats.group_of.get(names[0])
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
    xs = capture_inputs(stats.replay, clip, config.clip_tokens)
    for n, x in xs.items():
        lin = clip[n]
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
) -> dict[str, str | None]:
    """AWQ every decoder layer of `model` in place, then quantize its Linears (QuantLinear):
    round to nearest, or GPTQ with `gptq`. Returns {module name: qtype}."""
    plan: dict[str, str | None] = {}

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
            new = gptq_layer(where, stats, qtype_for, gptq, options, plan)
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

    run_layers(model, ids, process, progress=progress, desc="awq+gptq" if gptq else "awq")
    return plan
