"""`QuantizedCache`: a transformers `Cache` whose layers keep their keys and values quantized.

Storage per layer: the stored parts of `codecs.encode` in buffers that grow by doubling (an
append is amortized O(1); transformers' DynamicCache concatenates, O(length), every step). For
`int4` / `int2` the newest tokens of an unfilled 32-token group wait in the model's dtype (the
residual, at most 31 tokens); when the group fills, its keys and values are quantized once and
never touched again.

Attention: `update` returns float keys and values (what transformers' sdpa / eager attention
take), decoded into ONE workspace shared by all the layers of the cache: the only
full-precision copy is one layer's, transient, overwritten by the next layer's `update`, so the
memory saving holds. The returned tensors are views into that workspace, valid until the next
layer's `update` (transformers' attention consumes them before that).

The returned states are what the cache stores, except that for `int4` / `int2` the tokens of
the current call come back in full precision (in a token-by-token decode they would still wait
in the residual): feeding a text in 32-token chunks aligned to the groups then attends exactly
as a token-by-token stream does (how benches/kv_hf.py measures perplexity). The per-token types
return every token as stored, as the runtime's attention reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import codecs
from .types import GROUP, KV_TYPES, kv_shape, kv_type


class _Rows:
    """The stored parts of one role (keys or values) of one layer, appended along dim 2."""

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}
        self.n = 0  # rows used

    def append(self, new: dict[str, torch.Tensor]) -> None:
        k = next(iter(new.values())).shape[2]
        if k == 0:
            return
        if not self.parts:
            self.parts = {name: _with_capacity(t, max(k, 4)) for name, t in new.items()}
        elif self.n + k > next(iter(self.parts.values())).shape[2]:
            cap = max(self.n + k, 2 * next(iter(self.parts.values())).shape[2])
            self.parts = {name: _grow(t, self.n, cap) for name, t in self.parts.items()}
        for name, t in new.items():
            self.parts[name][:, :, self.n : self.n + k] = t
        self.n += k

    def view(self) -> dict[str, torch.Tensor]:
        return {name: t[:, :, : self.n] for name, t in self.parts.items()}

    def nbytes(self) -> int:
        return sum(t[:, :, : self.n].numel() * t.element_size() for t in self.parts.values())

    def map_batch(self, fn: Any) -> None:
        self.parts = {name: fn(t) for name, t in self.parts.items()}


def _with_capacity(t: torch.Tensor, cap: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[2] = cap
    return torch.empty(shape, dtype=t.dtype, device=t.device)


def _grow(t: torch.Tensor, used: int, cap: int) -> torch.Tensor:
    out = _with_capacity(t, cap)
    out[:, :, :used] = t[:, :, :used]
    return out


class _Workspace:
    """The one full-precision (keys, values) buffer pair a cache's layers decode into."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, d = shape
        key = (b, h, d, dtype, device)
        have = self.bufs.get(key)
        if have is None or have[0].shape[2] < n:
            cap = max(n, 2 * have[0].shape[2] if have is not None else 64)
            have = tuple(torch.empty(b, h, cap, d, dtype=dtype, device=device) for _ in range(2))
            self.bufs[key] = have
        return have[0][:, :, :n], have[1][:, :, :n]


class QuantizedLayer(CacheLayerMixin):
    """One attention layer's cache in a `KV_TYPES` type (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, kind: str, workspace: _Workspace) -> None:
        super().__init__()
        self.kind = kind
        self.kivi = KV_TYPES[kind].kivi
        self.workspace = workspace
        self.k_rows, self.v_rows = _Rows(), _Rows()
        self.n_quantized = 0  # tokens in the quantized rows
        self.res_k: torch.Tensor | None = None  # KIVI residual (B, H, 32, D), model dtype
        self.res_v: torch.Tensor | None = None
        self.n_res = 0

    def __repr__(self) -> str:
        return f"QuantizedLayer({self.kind}, {self.get_seq_length()} tokens)"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if d % GROUP:
            raise ValueError(
                f"kv_type {self.kind}: head_dim {d} is not a multiple of {GROUP} "
                "(the cache groups 32 values along head_dim)"
            )
        if value_states.shape[-1] != d:
            raise ValueError(f"keys have head_dim {d} but values {value_states.shape[-1]}")
        self.batch_size = b
        # the KIVI residual: a fixed (B, H, 32, D) buffer, the first n_res tokens in use
        room = GROUP if self.kivi else 0
        self.res_k = key_states.new_empty(b, h, room, d)
        self.res_v = value_states.new_empty(b, h, room, d)
        self.n_res = 0
        self.is_initialized = True

    # ------------------------------------------------------------------------------ appending
    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.kivi:
            self.k_rows.append(codecs.encode(self.kind, k, "k"))
            self.v_rows.append(codecs.encode(self.kind, v, "v"))
            self.n_quantized += k.shape[2]
            return
        r, n = self.n_res, k.shape[2]
        if r + n < GROUP:  # the common decode step: one write into the residual buffer
            self.res_k[:, :, r : r + n] = k
            self.res_v[:, :, r : r + n] = v
            self.n_res = r + n
            return
        if r:
            k = torch.cat([self.res_k[:, :, :r], k], dim=2)
            v = torch.cat([self.res_v[:, :, :r], v], dim=2)
        full = k.shape[2] // GROUP * GROUP
        self.k_rows.append(codecs.encode(self.kind, k[:, :, :full], "k"))
        self.v_rows.append(codecs.encode(self.kind, v[:, :, :full], "v"))
        self.n_quantized += full
        self.n_res = k.shape[2] - full
        self.res_k[:, :, : self.n_res] = k[:, :, full:]
        self.res_v[:, :, : self.n_res] = v[:, :, full:]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        out_k, out_v = self._materialize()
        if self.kivi:
            # streaming semantics: the tokens of this call attend to each other (and to the
            # earlier residual tokens) in full precision, as they would one token at a time,
            # where a token waits in the residual until its 32-token group fills
            n = key_states.shape[2]
            out_k[:, :, -n:] = key_states
            out_v[:, :, -n:] = value_states
        return out_k, out_v

    # ------------------------------------------------------------------------------- reading
    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, _, d = self.res_k.shape
        n = self.n_quantized
        total = n + self.n_res
        out_k, out_v = self.workspace.get((b, h, total, d), self.dtype, self.device)
        if n:
            if self.dtype == torch.float32:
                codecs.decode(self.kind, self.k_rows.view(), out_k[:, :, :n], "k")
                codecs.decode(self.kind, self.v_rows.view(), out_v[:, :, :n], "v")
            else:  # decode in float32 (the formats' arithmetic), then the model's dtype
                tmp_k, tmp_v = self.workspace.get((b, h, n, d), torch.float32, self.device)
                codecs.decode(self.kind, self.k_rows.view(), tmp_k, "k")
                codecs.decode(self.kind, self.v_rows.view(), tmp_v, "v")
                out_k[:, :, :n].copy_(tmp_k)
                out_v[:, :, :n].copy_(tmp_v)
        if total > n:
            out_k[:, :, n:].copy_(self.res_k[:, :, : self.n_res])
            out_v[:, :, n:].copy_(self.res_v[:, :, : self.n_res])
        return out_k, out_v

    def stored_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The quantized keys' and values' stored parts (views; for tests and inspection)."""
        return self.k_rows.view(), self.v_rows.view()

    def nbytes(self) -> int:
        """Bytes held: the quantized rows plus the full-precision residual."""
        res = 0
        if self.res_k is not None:
            per_token = self.res_k[:, :, :1].numel() * self.res_k.element_size()
            res = 2 * self.n_res * per_token
        return self.k_rows.nbytes() + self.v_rows.nbytes() + res

    # ------------------------------------------------------------------ the Cache layer API
    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_quantized + self.n_res

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k_rows, self.v_rows = _Rows(), _Rows()
        self.n_quantized = 0
        self.res_k = self.res_v = None
        self.n_res = 0
        self.is_initialized = False

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        self.k_rows.map_batch(fn)
        self.v_rows.map_batch(fn)
        self.res_k, self.res_v = fn(self.res_k), fn(self.res_v)
        self.batch_size = self.res_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every stored row belongs to one sequence, so the quantized parts are
        reordered as they are (exact, no round trip through floats)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            f"ferroquant QuantizedCache ({self.kind}) cannot be cropped: quantized tokens keep no "
            "full-precision copy (assisted decoding needs a croppable cache such as DynamicCache)"
        )

    def offload(self) -> None:  # the stored parts stay where they are
        return None

    def prefetch(self) -> None:
        return None


class QuantizedCache(Cache):
    """A transformers `Cache` storing keys and values in `kv_type` (`f32 f16 q8_0 fp8_e4m3 q4_0
    int4 int2`, see docs/kv.md), for `model.generate(..., past_key_values=cache)` or a plain
    forward with `use_cache=True`. One cache serves one generation (call `reset()` to reuse)."""

    def __init__(self, config: Any, kv_type: str = "int4") -> None:
        kind = _kv_type_name(kv_type)
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(
                f"QuantizedCache supports full-attention layers only; the config has {other}"
            )
        shape = kv_shape(text_config)
        self.kv_type = kind
        self.workspace = _Workspace()
        layers = [QuantizedLayer(kind, self.workspace) for _ in range(shape.n_layer)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes the cache holds now (quantized rows and residuals; the transient workspace
        excluded, see `workspace_nbytes`)."""
        return sum(layer.nbytes() for layer in self.layers)

    def workspace_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.workspace.bufs.values() for t in p)


def _kv_type_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"kv_type must be a string naming a type, got {type(name).__name__}")
    return kv_type(name).name
