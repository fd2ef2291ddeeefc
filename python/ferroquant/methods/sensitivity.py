"""The measurement pass of the allocator: per weight, the mean squared input per column (the
importance matrix, per token) and the mean squared gradient of the calibration loss per output
(the diagonal empirical Fisher), from forward + backward passes over calibration windows
(summed next-token cross-entropy, so each position's output gradient is its own loss's).

For the token embedding: its use as the input lookup (rows weighted by token counts, columns by
the squared gradient at the embedding output) and, when tied, its use as the output head (the
output head's Linear). Weights are not changed by the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .allocate import Sensitivity

__all__ = ["measure_sensitivity"]


def measure_sensitivity(
    model: Any,
    ids: Any,
    names: dict[str, str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Sensitivity]:
    """{llama.cpp tensor name: Sensitivity} for every Linear of `model` in `names` ({module name:
    tensor name}, `imatrix.gguf_linear_names`) and the token embedding (token_embd.weight)."""
    import torch
    from torch import nn

    x2: dict[str, torch.Tensor] = {}
    g2: dict[str, torch.Tensor] = {}
    n_tok = [0]
    handles = []

    def fwd(g: str) -> Callable[..., None]:
        def pre(mod: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            s = (x * x).sum(0)
            x2[g] = x2[g] + s if g in x2 else s

        return pre

    def bwd(g: str) -> Callable[..., None]:
        def hook(mod: Any, grad_in: Any, grad_out: Any) -> None:
            y = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).to(torch.float64)
            s = (y * y).sum(0)
            g2[g] = g2[g] + s if g in g2 else s

        return hook

    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    tok_counts = torch.zeros(vocab, dtype=torch.float64)
    lin_names = {}
    for mod_name, mod in model.named_modules():
        g = names.get(mod_name)
        if g is not None and isinstance(mod, nn.Linear):
            lin_names[g] = mod
            handles.append(mod.register_forward_pre_hook(fwd(g)))
            handles.append(mod.register_full_backward_hook(bwd(g)))
    emb_key = "token_embd.weight#input"
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for k in range(ids.shape[0]):
            row = ids[k : k + 1]
            # the embedding output needs a gradient for the hooks to fire on a frozen model
            h = emb(row).detach().requires_grad_(True)
            out = model(inputs_embeds=h, use_cache=False)
            logits = out.logits[0, :-1].to(torch.float32)
            loss = nn.functional.cross_entropy(logits, row[0, 1:], reduction="sum")
            loss.backward()
            gi = h.grad.detach().reshape(-1, h.shape[-1]).to(torch.float64)
            s = (gi * gi).sum(0)
            g2[emb_key] = g2[emb_key] + s if emb_key in g2 else s
            tok_counts += torch.bincount(row[0], minlength=vocab).to(torch.float64)
            n_tok[0] += row.shape[1]
            if progress is not None:
                progress(k + 1, ids.shape[0])
    finally:
        for hd in handles:
            hd.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    n = float(max(n_tok[0], 1))
    out: dict[str, Sensitivity] = {}
    for g in lin_names:
        if g in x2 and g in g2:
            out[g] = Sensitivity((x2[g] / n).numpy(), (g2[g] / n).numpy())
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is emb.weight
    )
    head = out.pop("output.weight", None) if tied else None
    lookup = Sensitivity(
        head.inputs if head is not None else None,
        head.outputs if head is not None else None,
        (tok_counts / n).numpy(),
        (g2.get(emb_key, torch.zeros(emb.weight.shape[1])) / n).numpy(),
    )
    out["token_embd.weight"] = lookup
    return {k: _finite(k, v) for k, v in out.items()}


def _finite(name: str, s: Sensitivity) -> Sensitivity:
    for part in (s.inputs, s.outputs, s.row_weight, s.col_weight):
        if part is not None and not np.isfinite(part).all():
            raise ValueError(f"non-finite activations or gradients at {name}")
    return s
