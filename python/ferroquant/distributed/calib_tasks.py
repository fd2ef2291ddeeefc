"""What the Ray tasks of the calibrated methods run: the single-machine functions on one shard of
the calibration windows (a layer's input statistics, a layer's outputs, AWQ's per-window search
results, GPTQ's per-group moments against the float stream, an importance matrix's per-chunk
sums) or on one GPTQ solve. Ray is not imported here:
`calibrated.py` wraps these with `ray.remote`. Every function runs under `torch.no_grad`, as the
single-machine pipeline does."""

from __future__ import annotations

from typing import Any


def layer_stats(
    layer: Any, call: Any, hidden: list[Any], where: str
) -> tuple[list[Any], list[int], dict[str, int], list[Any] | None]:
    """One shard's statistics of `layer`'s Linears: (float64 sums of x^T x per input group,
    token counts, {Linear name: group}, float64 sums of |x| per input group)."""
    import torch

    from ..calib.capture import collect_stats

    with torch.no_grad():
        stats = collect_stats(layer, call, hidden, where)
    return stats.sums, stats.counts, stats.group_of, stats.abs_sums


def layer_outputs(layer: Any, call: Any, hidden: list[Any], where: str) -> list[Any]:
    """One shard's outputs of `layer` (the next layer's inputs; they stay in the object store)."""
    import torch

    from ..calib.capture import layer_outputs as outputs

    with torch.no_grad():
        return outputs(layer, call, hidden, where)


def window_map(fn: Any, layer: Any, call: Any, hidden: list[Any], first: int, *args: Any) -> list:
    """`calib.LocalWindows.map`'s `fn` on one shard of windows (`first`: its first window's
    index): its per-window results (AWQ's sums, candidates' losses, strided inputs)."""
    import torch

    with torch.no_grad():
        return fn(layer, call, hidden, first, *args)


def pair_map(fn: Any, layer: Any, other: Any, call: Any, hidden: list[Any],
             other_hidden: list[Any] | None, *args: Any) -> list:  # fmt: skip
    """`calib.LocalWindows.map_pair`'s `fn` on one shard: two layers on the quantized and the
    float model's hidden states of the same windows (GPTQ's asymmetric / true-sequential
    moments); its per-shard results."""
    import torch

    with torch.no_grad():
        return fn(layer, other, call, hidden, other_hidden, *args)


def gptq_solve(job: Any, hessian: Any) -> tuple[Any, Any]:
    """One GPTQ solve (`methods.layerwise.SolveJob`), its Hessian shipped once per group."""
    import dataclasses

    return dataclasses.replace(job, hessian=hessian).run()


def imatrix_shard(model: Any, ids: Any, names: dict[str, str], process_output: bool) -> list:
    """Per chunk of `ids`, the importance-matrix contributions (`methods.imatrix.chunk_events`)."""
    from ..methods.imatrix import chunk_events

    return list(chunk_events(model, ids, names, process_output=process_output))
