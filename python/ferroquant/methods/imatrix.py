"""Importance matrices, llama.cpp's definition (tools/imatrix): for every weight matrix, the sum
over the calibration tokens of x_j^2 for each input column j, and the number of tokens. It is
the diagonal of the second moment GPTQ inverts (`calib.InputStats`: H = 2/n sum x x^T), without
the off-diagonal part, so it costs O(columns) memory per matrix.

The text is cut as llama-imatrix cuts it: tokenized once (with BOS in front when the vocabulary
adds one), then `n_chunks` consecutive chunks of `ctx` tokens, each chunk's first token replaced
by BOS when the vocabulary adds one; each chunk is one forward pass. No weight changes between
passes, so hooks on every Linear in one ordinary forward pass give the same sums as the
layer-by-layer capture would. The output head is left out unless `process_output` (llama.cpp's
`--process-output`). Activations are float32 (llama.cpp runs its matmuls on the weights' type;
see benches/bench_allocation.py for how far that moves the values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .imatrix_io import ImatrixEntry, ImportanceMatrix

__all__ = [
    "ImatrixSums",
    "check_imatrix",
    "chunk_events",
    "chunk_ids",
    "compute_imatrix",
    "gguf_linear_names",
]


def chunk_ids(tokenizer: Any, text: str, ctx: int, n_chunks: int | None, bos: int | None) -> Any:
    """llama-imatrix's chunks: [n, ctx] token ids (torch int64); `bos` replaces each chunk's
    first token (and leads the stream) when not None. Too short a text: ValueError."""
    import torch

    if ctx < 16:
        raise ValueError(f"--ctx must be at least 16 (llama.cpp skips smaller batches), got {ctx}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if bos is not None:
        ids = [bos, *ids]
    have = len(ids) // ctx
    if have < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    n = have if n_chunks is None or n_chunks <= 0 else min(n_chunks, have)
    out = torch.tensor(ids[: n * ctx], dtype=torch.int64).reshape(n, ctx).clone()
    if bos is not None:
        out[:, 0] = bos
    return out


def gguf_linear_names(model: Any, arch: str) -> dict[str, str]:
    """{module name: llama.cpp tensor name} for every nn.Linear of a transformers model (gguf-py's
    tensor name map: model.layers.0.self_attn.q_proj -> blk.0.attn_q.weight)."""
    import gguf
    from torch import nn

    archs = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not archs:
        raise ValueError(f"unknown llama.cpp architecture {arch!r}")
    n_layer = int(getattr(model.config, "num_hidden_layers", 0))
    tmap = gguf.get_tensor_name_map(archs[0], n_layer)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            g = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if g is not None:
                out[name] = g
    return out


# one Linear call's contribution: (llama.cpp tensor name, sum over its tokens of x^2 in float64,
# tokens)
Event = tuple[str, Any, int]


def chunk_events(
    model: Any, ids: Any, names: dict[str, str], *, process_output: bool = False
) -> Iterator[list[Event]]:
    """For each chunk of `ids` [n, ctx] (one forward pass each), its Linears' contributions in
    the order the forward pass made them. `compute_imatrix` adds them up here;
    `ferroquant.distributed` computes shards of chunks on a cluster and adds them in the same
    order (the same bits)."""
    import torch

    events: list[Event] = []
    handles = []

    def hook(gname: str) -> Callable[..., None]:
        def pre(mod: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s = (x * x).sum(0, dtype=torch.float64)
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"non-finite activations at the input of {gname}")
            events.append((gname, s, x.shape[0]))

        return pre

    for mod_name, mod in model.named_modules():
        g = names.get(mod_name)
        if g is None or (g == "output.weight" and not process_output):
            continue
        handles.append(mod.register_forward_pre_hook(hook(g)))
    try:
        with torch.no_grad():
            for k in range(ids.shape[0]):
                model(input_ids=ids[k : k + 1], use_cache=False)
                yield events
                events = []
    finally:
        for h in handles:
            h.remove()


class ImatrixSums:
    """The running sums and token counts, added chunk by chunk in chunk order."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, events: list[Event]) -> None:
        for g, s, n in events:
            self.sums[g] = self.sums[g] + s if g in self.sums else s
            self.counts[g] = self.counts.get(g, 0) + n

    def result(self, ids_shape: tuple[int, ...], dataset: str = "") -> ImportanceMatrix:
        import torch

        entries = {
            g: ImatrixEntry(
                s.to(torch.float32).numpy().reshape(1, -1),
                np.array([self.counts[g]], np.float32),
            )
            for g, s in self.sums.items()
        }
        return ImportanceMatrix(entries, [dataset] if dataset else [], int(ids_shape[0]),
                                int(ids_shape[1]))  # fmt: skip


def compute_imatrix(
    model: Any,
    ids: Any,
    names: dict[str, str],
    *,
    process_output: bool = False,
    dataset: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ImportanceMatrix:
    """The importance matrix of `model` (a transformers causal LM) over the chunks `ids`
    [n, ctx]; `names` maps its Linear modules to llama.cpp tensor names (`gguf_linear_names`)."""
    total = ImatrixSums()
    for k, events in enumerate(chunk_events(model, ids, names, process_output=process_output)):
        total.add(events)
        if progress is not None:
            progress(k + 1, ids.shape[0])
    return total.result(tuple(ids.shape), dataset)


def check_imatrix(
    imatrix: ImportanceMatrix, columns: dict[str, int], source: str | Path = "the imatrix"
) -> None:
    """ValueError naming the tensor when an entry of `imatrix` is not a weight of the model
    (`columns`: {llama.cpp tensor name: input columns}) or has another column count."""
    for name, e in imatrix.entries.items():
        if name not in columns:
            raise ValueError(
                f"{source}: tensor {name} is not a weight of this model "
                f"(an imatrix made for another model?)"
            )
        if e.cols != columns[name]:
            raise ValueError(
                f"{source}: tensor {name} has {e.cols} columns, the model's has {columns[name]}"
            )
