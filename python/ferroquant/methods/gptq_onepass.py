"""True-sequential GPTQ in one forward pass per decoder layer, when the calibration windows are
one shard (at most `calib.capture.SHARD_WINDOWS` windows, on this machine).

`gptq_sequential` recomputes a group's inputs by running the layer from its start once per
group (q/k/v, then o, gate/up, down) and once more for the layer's outputs: the attention and
the Linears before a group run again for every group after it. Here the groups are solved
inside the layer's single forward pass instead: a pre-hook on each group's first Linear takes
the group's inputs as the pass delivers them (the groups before it already quantized), sums
their x^T x, solves the group and writes its quantized values into the weights before the
Linear's product runs, and the pass goes on with them; its output is the quantized layer's,
the next layer's input. With the asymmetric target (`GPTQConfig.asym_alpha`) the float copy of
the layer runs once on the float model's hidden states first, keeping every group's input and
its output (the next layer's float stream).

The statistics and the forward passes are the same computations on the same batch as
`gptq_sequential`'s (one shard: one batched call, its x^T x widened to float64 and scaled), so
the stored bytes are the same (tests/test_gptq_onepass.py). Several shards would need every
shard's inputs of a group before the group can be solved, hence every shard's pass held open at
once (all windows' activations in memory): they, and a cluster runner, keep the multi-pass path.
Which Linears share an input is found on one window of the first layer (stopped at its last
Linear's input) and checked during every layer's pass: a layer that calls its Linears otherwise
(data-dependent calls, a different structure) gets its weights back and takes the multi-pass
path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib import InputStats
from ..calib.capture import (
    SHARD_WINDOWS,
    LayerCall,
    _first,
    _Stop,
    all_finite,
    find_decoder_layers,
    first_layer_inputs,
    forward_autocast,
    gram,
    progress_bar,
    shard_batches,
)
from .gptq import GPTQConfig
from .layerwise import LocalRunner, gptq_layer, swap_in

ENABLED = True  # False: every true-sequential / asymmetric run takes gptq_sequential's passes


def applies(ids: torch.Tensor, runner: Any) -> bool:
    """Whether `one_pass_gptq_model` runs these windows: enabled, on this machine (no runner),
    and all of them in one shard."""
    return ENABLED and runner is None and ids.ndim == 2 and ids.shape[0] <= SHARD_WINDOWS


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def shared_inputs(layer: nn.Module, call: LayerCall, batch: torch.Tensor) -> list[list[str]]:
    """The layer's Linears grouped by the input tensor they receive, in call order, from one
    window of `batch` (stopped once every Linear has had its input)."""
    linears = _linears(layer)
    groups: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            for x, names in groups:
                if x is args[0]:
                    names.append(name)
                    break
            else:
                groups.append((args[0], [name]))
            if sum(len(n) for _, n in groups) == len(linears):
                raise _Stop

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    one = batch[:1]
    try:
        with forward_autocast(one):
            layer(one, *call.args, **call.kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [names for _, names in groups]


def _float_inputs(
    layer: nn.Module, call: LayerCall, batch: torch.Tensor, leaders: list[str], where: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({leader: its input rows [tokens, d]}, output) of the float `layer` on `batch`."""
    got: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            got[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return pre

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in leaders]
    try:
        with forward_autocast(batch):
            y = _first(layer(batch, *call.args, **call.kwargs)).to(batch.dtype)
    finally:
        for h in handles:
            h.remove()
    if not all_finite(y):
        raise ValueError(f"non-finite activations at the output of {where}")
    return got, y


class Mismatch(Exception):
    """The pass called the layer's Linears otherwise than `groups` said (the layer's weights
    may be partly solved: the caller restores them and takes the multi-pass path)."""


LayerResult = tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor | None]


def one_pass_layer(
    where: str,
    layer: nn.Module,
    call: LayerCall,
    batch: torch.Tensor,
    fp_batch: torch.Tensor | None,
    groups: list[list[str]],
    qtype_for: Callable[[str, nn.Linear], str | None],
    config: GPTQConfig,
    options: dict[str, Any],
    plan: dict[str, str | None],
) -> LayerResult:
    """True-sequential GPTQ of one decoder layer (float32 now) on the windows `batch` [n, L, d]
    in one forward pass (see the module docstring); `groups`: its Linears by shared input, in
    call order (`shared_inputs`), checked on the way (`Mismatch`). `fp_batch`: the float
    model's hidden states entering the layer (asymmetric target), or None. Returns (the
    QuantLinears to swap in by name, the quantized layer's outputs, the float layer's outputs
    or None)."""
    stats = InputStats(layer, where)  # the Linears by name, for gptq_layer (no hooks kept)
    stats.remove()
    stats.group_of = {nm: g for g, names in enumerate(groups) for nm in names}
    leader_of = {nm: names[0] for names in groups for nm in names}
    fp_inputs: dict[str, torch.Tensor] = {}
    fp_out = None
    if fp_batch is not None:
        fp_layer = copy.deepcopy(layer)
        fp_inputs, fp_out = _float_inputs(fp_layer, call, fp_batch, [g[0] for g in groups], where)
        del fp_layer
    seen: dict[str, torch.Tensor] = {}
    new: dict[str, nn.Module] = {}

    def hook(name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            lead = leader_of.get(name)
            if lead is None or (name == lead) == any(x is t for t in seen.values()):
                raise Mismatch(f"{where}.{name}")  # unforeseen, or shares an input it did not
            if name != lead:
                if seen.get(lead) is not x:
                    raise Mismatch(f"{where}.{name}")
                return
            seen[name] = x
            names = next(g for g in groups if g[0] == name)
            x2 = x.detach().reshape(-1, x.shape[-1])
            with torch.autocast(x2.device.type, enabled=False):  # float32 sums and solves
                prod = gram(x2)
                if not bool(torch.isfinite(torch.diagonal(prod)).all()):
                    raise ValueError(f"non-finite activations at the input of {where}.{name}")
                scale = 2.0 / max(int(x2.shape[0]), 1)
                # float64(prod) * scale in one pass (numpy casts as it multiplies): the values
                # of prod.to(float64).mul_(scale), without the float64 copy between
                h = torch.from_numpy(np.multiply(prod.numpy(), scale, dtype=np.float64))
                d = None
                if name in fp_inputs:
                    xq = x2.to(torch.float32)
                    xf = fp_inputs.pop(name).to(torch.float32)
                    d = ((xf - xq).T @ xq).to(torch.float64) * scale
                new.update(gptq_layer(where, stats, qtype_for, config, options, plan,
                                      LocalRunner().solve, groups=[(names, h, d)],
                                      rest=False))  # fmt: skip

        return pre

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in stats.linears.items()]
    try:
        with forward_autocast(batch):
            y = _first(layer(batch, *call.args, **call.kwargs)).to(batch.dtype)
    finally:
        for hd in handles:
            hd.remove()
    if len(seen) != len(groups):  # a group never reached: it would stay unsolved
        raise Mismatch(f"{where}: {sorted(set(g[0] for g in groups) - set(seen))} not called")
    if not all_finite(y):
        raise ValueError(f"non-finite activations at the output of {where}")
    # Linears the pass never called are rounded, as gptq_layer does after the capture's pass
    new.update(gptq_layer(where, stats, qtype_for, config, options, plan, groups=[]))
    return new, y, fp_out


def one_pass_gptq_model(
    model: nn.Module,
    qtype_for: Callable[[str, nn.Linear], str | None],
    ids: torch.Tensor,
    config: GPTQConfig,
    options: dict[str, Any],
    fallback: Callable[..., LayerResult],
    *,
    progress: bool = True,
) -> dict[str, str | None]:
    """`gptq_sequential.sequential_gptq_model` on windows that `applies` to, one forward pass a
    layer (and one of its float copy with `config.asym_alpha`). Returns {module name: qtype}.
    Which Linears share an input is found on the first layer and taken again for the next ones
    of the same structure (found anew after a change); a layer whose pass disagrees (`Mismatch`:
    data-dependent calls, another structure) gets its weights back and goes through
    `fallback(where, layer, call, batch, fp_batch, qtype_for, config, options, plan)`, the
    multi-pass path."""
    plan: dict[str, str | None] = {}
    prefix, layers = find_decoder_layers(model)
    known: tuple[Any, list[list[str]]] | None = None  # (structure, its groups)
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, ids)
        (batch,) = shard_batches(hidden)
        fp_batch = batch if config.asym_alpha > 0 else None
        with progress_bar(len(layers), "gptq", progress) as bar:
            for i, layer in enumerate(layers):
                where, call = f"{prefix}.{i}", calls[i]
                dtypes = {p.dtype for p in layer.parameters()}
                dtype = dtypes.pop() if len(dtypes) == 1 else None
                layer.to(torch.float32)
                shape = (type(layer), tuple(_linears(layer)))
                if known is None or known[0] != shape:
                    known = (shape, shared_inputs(layer, call, batch))
                weights = {n: m.weight.data for n, m in _linears(layer).items()}
                args = (qtype_for, config, options, plan)
                try:
                    new, batch, fp_batch = one_pass_layer(
                        where, layer, call, batch, fp_batch, known[1], *args
                    )
                except Mismatch:
                    for n, w in weights.items():  # gptq_layer replaced .data, never wrote it
                        layer.get_submodule(n).weight.data = w
                    known = None
                    new, batch, fp_batch = fallback(where, layer, call, batch, fp_batch, *args)
                swap_in(layer, new)
                if dtype is not None:
                    layer.to(dtype)
                bar.update(1)
    return plan
