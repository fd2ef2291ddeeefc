"""The attention function `ferroquant_kv`: transformers' sdpa attention, except that a decode
step (one query token) over a `QuantizedCache` layer reads the quantized blocks in place.

transformers' attention modules call `cache.update(k, v)` and then the configured attention
function with whatever `update` returned. With a plain attention function a quantized cache
must return whole float K/V, i.e. dequantize the layer's entire cache every step. When the
model's config names `ferroquant_kv` (QuantizedCache switches an sdpa config to it, see
`cache.py`), the layer's `update` instead returns the step's own key/value tensors tagged with
the layer, and this function computes the step's attention in one native call per layer
(`_native.kv_attend_decode`, rust/core/src/runtime/kv_tensor.rs): keys and values are decoded
one row at a time into a head_dim-sized scratch, never a float copy of the cache.

Everything else (prefill, chunks of several tokens, other caches, a mask that is not a plain
(batch, positions) padding mask, autograd) goes to transformers' own sdpa attention, on the
dequantized layer where the tensors are ours: bit for bit what the model computes without us.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

NAME = "ferroquant_kv"
_TAG = "_ferroquant_kv_layer"
_EMPTY = np.empty(0, dtype=np.uint8)


def register() -> None:
    """Register `ferroquant_kv` (attention and mask) with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def tag(key_states: torch.Tensor, layer: Any) -> torch.Tensor:
    """Mark `key_states` (the step's keys, returned by `update`) as belonging to `layer`."""
    setattr(key_states, _TAG, layer)
    return key_states


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layer = getattr(key, _TAG, None)
    if layer is not None:
        plain = (
            dropout == 0.0
            and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None
            and kwargs.get("position_bias") is None
        )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        st = layer._fast_state  # the update wrote the token natively (cache.py, KvLayerState)
        if st is not None and attention_mask is None and plain:
            out = st.attend(query, scale)  # None: a query the state does not take
            if out is not None:
                return out, None
        mask = _padding_mask(attention_mask, layer.get_seq_length())
        if plain and mask is not False and query.shape[2] == 1 and not query.requires_grad:
            return layer.attend_decode(query, key, value, mask, scale), None
        key, value = layer.states_for_attention(key, value)
    return _sdpa()(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _sdpa() -> Any:
    """transformers' sdpa attention (imported once: an import statement in the per-layer call
    costs about a microsecond)."""
    global _SDPA
    if _SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _SDPA = sdpa_attention_forward
    return _SDPA


_SDPA: Any = None


def _padding_mask(mask: torch.Tensor | None, positions: int) -> torch.Tensor | None | bool:
    """A decode step's mask as (batch, positions) uint8 (None: attend everywhere; False: a
    mask this path does not take)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != positions:
        return False
    m = mask[:, 0, 0, :]
    if m.dtype != torch.bool:
        return False
    return m.to(torch.uint8).contiguous()


def as_bytes(t: torch.Tensor | None) -> np.ndarray:
    """A contiguous CPU tensor's storage as a flat uint8 numpy view (no copy)."""
    if t is None:
        return _EMPTY
    if not t.is_contiguous():
        t = t.contiguous()
    return t.detach().reshape(-1).view(torch.uint8).numpy()
