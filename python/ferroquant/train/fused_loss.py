"""A fused, chunked lm_head + next-token cross-entropy for training over a frozen lm_head (QLoRA:
the tied embedding takes no gradient), as Liger-Kernel's and Unsloth's fused linear
cross-entropy do on the GPU.

The model's own path writes the whole logits tensor (batch x seq x vocab in float32: 201 MB for
4 x 256 tokens of SmolLM2's 49152-word vocabulary), then log-softmax and its gradient, each as
large again. Here the rows go through in chunks: each chunk's logits, their log-sum-exp, the
loss terms, and at once the gradient with respect to the hidden states, `(softmax - onehot) /
n @ W` (the loss is the graph's last node, so its upstream gradient is a scalar that backward
only multiplies in); one chunk's logits exist at a time.

The lm_head GEMMs run in `dtype`: float32 is the model's own math up to the summation order;
bfloat16 (what `causal_lm_loss` picks when the frozen base layers compute in bfloat16, as
QuantLinear's training path does by default) rounds the hidden states, W and the logits to
bfloat16, with float32 accumulation in the GEMM, exactly as every base layer's forward and
input gradient do. The softmax, the loss and its sum stay float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100  # transformers' and torch's ignore_index for labels
# model types whose causal-LM forward is exactly `lm_head(decoder(ids))` then cross-entropy (no
# logit soft-capping or scaling); the others take the model's own loss
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3"})
CHUNK_ROWS = 256  # 256 x 49152 float32 logits: 50 MB a chunk; GEMM speed flat from 128 to 512


class LinearCrossEntropy(torch.autograd.Function):
    """mean over the rows whose label is not IGNORE_INDEX of `-log softmax(h W^T)[label]`,
    without the full logits: h (n x k) float, W (v x k) frozen, labels (n,) int64."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        dtype: torch.dtype,
        chunk: int,
    ) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        want_grad = hidden.requires_grad
        w = weight.detach().to(dtype)
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].detach().to(dtype)
            logits = h @ w.t()
            y, ok = labels[s : s + chunk], valid[s : s + chunk]
            safe = torch.where(ok, y, 0).unsqueeze(1)
            top = logits.amax(dim=1, keepdim=True).float()
            # z = logits - max in float32: one pass that also widens bfloat16 logits
            z = logits.sub_(top) if logits.dtype == torch.float32 else logits - top
            del logits
            z_y = z.gather(1, safe).squeeze(1)
            e = z.exp_()  # exp(z) in place: the softmax's numerators
            total_e = e.sum(dim=1)
            total += ((total_e.log() - z_y) * ok).sum()  # lse - logit[y], lse = max + log(sum)
            if grad is not None:
                # d loss / d logits = (softmax - onehot(y)) / count on the valid rows: subtract
                # sum(e) at y, then scale every row by 1 / (sum(e) * count)
                okf = ok.to(e.dtype)
                e.scatter_add_(1, safe, -(total_e * okf).unsqueeze(1))
                scale = (okf / (total_e * max(count, 1))).unsqueeze(1)
                # (into `dtype` in the same pass: torch rounds the float32 product once)
                d = (
                    torch.mul(e, scale, out=torch.empty(e.shape, dtype=dtype))
                    if dtype != e.dtype
                    else e.mul_(scale)
                )
                grad[s : s + chunk] = (d @ w).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        # as torch's mean cross-entropy: NaN when every label is ignored
        return total / count if count else total * float("nan")

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)` in chunks, the GEMMs in
    `dtype`; `weight` must not require grad (its gradient is not computed)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the weight: freeze it")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: need n x k and v x k"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} need one per row of hidden ({len(hidden)})")
    return LinearCrossEntropy.apply(hidden, weight, labels, dtype, max(1, chunk))


def _inner(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # peft's wrapper
    return get() if callable(get) else model


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) when `model`'s loss can take the fused path: a causal LM of a plain-head
    type whose lm_head is a bias-free nn.Linear that takes no gradient; else None."""
    inner = _inner(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    return decoder, head


def base_compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen QuantLinear layers compute in while training (their train_dtype, if
    they agree), else float32."""
    from ..nn import QuantLinear

    dts = {m.train_dtype for m in model.modules() if isinstance(m, QuantLinear)}
    return dts.pop() if len(dts) == 1 else torch.float32


def causal_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The next-token loss of `model(input_ids=ids, labels=ids).loss`; through the fused head
    when `fused_head(model)` allows it (the lm_head GEMMs in `dtype`, default: the base layers'
    compute dtype), else the model's own. The fused path skips the logits and the K/V cache."""
    parts = fused_head(model)
    if parts is None:
        return model(input_ids=input_ids, labels=input_ids).loss
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    return linear_cross_entropy(h, head.weight, labels, dtype or base_compute_dtype(model))
