"""`QuantizedCache`: a transformers `Cache` whose layers keep their keys and values quantized.

Storage per layer: the stored parts of `codecs.encode` in buffers that grow by doubling (an
append is amortized O(1); transformers' DynamicCache concatenates, O(length), every step). For
`int4` / `int2` the newest tokens of an unfilled KIVI group (`types.kivi_group`: 64 tokens where
head_dim is a multiple of 64, as in the runtime, else 32) wait in the model's dtype (the
residual); when the group fills, its keys and values are quantized once and never touched again.

Attention, decode steps (one new token): with the model's attention set to `ferroquant_kv`
(`attention.py`; the cache switches an sdpa model to it unless `fast_decode=False`), `update`
returns the step's own key/value tensors, tagged, and the attention function reads the quantized
rows in place (one native call per layer). No float copy of the cache exists at any time. For
the KIVI types of a float32 model the common step (no group to quantize) is two short native
calls on the layer's `_native.KvLayerState`: `push` (from `update`) writes the token into the
residual, `attend` (from the attention function) returns the output in the layer's own output
tensor, valid until the layer's next step; no per-step Python bookkeeping or tensor creation.

Attention, everything else (prefill, chunks, or `fast_decode=False`): `update` returns float
keys and values, decoded into ONE workspace shared by all the layers of the cache: the only
full-precision copy is one layer's, transient, overwritten by the next layer's `update`. The
returned tensors are views into that workspace, valid until the next layer's `update`
(transformers' attention consumes them before that).

Both paths attend to the same values: what the cache stores, except that for `int4` / `int2`
the tokens of the current call come back in full precision (in a token-by-token decode they
would still wait in the residual): feeding a text in 32-token chunks (aligned to the groups) then
attends exactly as a token-by-token stream does (how benches/kv_hf.py measures perplexity). The
per-token types return every token as stored, as the runtime's attention reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import _native
from . import attention, codecs, rotate
from .buffers import PART_NAMES, _plain_f32, _Rows, _Workspace
from .native_step import NativeStep
from .types import GROUP, KV_TYPES, kivi_group, kv_shape, kv_type, kv_window


class QuantizedLayer(NativeStep, CacheLayerMixin):
    """One attention layer's cache in a `KV_TYPES` type (see the module docstring).

    KIVI types keep a full-precision buffer `fp_k` / `fp_v` (B, H, S + R + G, D) in the model's
    dtype: slots 0 .. S-1 the sinks (tokens 0 .. S-1, for good), slots S .. S+n_res-1 the
    residual (tokens max(S, n_quantized) .. N-1). With rotation every stored row (quantized or
    not) is in the rotated domain; what `update` returns is rotated back."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        kind: str,
        workspace: _Workspace,
        fast_decode: Callable[[], bool] = lambda: False,
        group: int | None = None,
        sinks: int | None = None,
        residual: int | None = None,
        rotation: bool | None = None,
        n_head: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        # KIVI group (tokens per key group, channels per value group): `kivi_group(head_dim)`
        # (64 like the runtime, 32 where head_dim is not a multiple of 64) unless given
        self.group = group if KV_TYPES[kind].kivi else GROUP
        self.fast_decode = fast_decode  # is the model's attention `ferroquant_kv` now?
        self.kivi = KV_TYPES[kind].kivi
        self.sinks, self.residual = kv_window(kind, sinks, residual)
        self.rotation = KV_TYPES[kind].rotation if rotation is None else bool(rotation)
        self.workspace = workspace
        self.k_rows, self.v_rows = _Rows(), _Rows()
        self.n_tokens = 0  # tokens appended
        self.n_quantized = 0  # tokens in the quantized rows (KIVI: whole groups)
        self.fp_k: torch.Tensor | None = None  # KIVI sinks + residual, model dtype
        self.fp_v: torch.Tensor | None = None
        self.n_res = 0
        self._res_views: tuple[Any, Any] | None = None  # numpy views for attend_decode
        self._mask_buf: np.ndarray | None = None
        self._visible = 0  # quantized tokens the last call's attention sees
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        # the native decode step (`_native.KvLayerState`, KIVI types of a float32 model): one
        # call writes the step's token (`update`), one attends (`attention.attention`)
        self.n_head = n_head  # query heads (the state's output shape); None: no native state
        self._state: Any = None
        self._state_gen: tuple[int, int] = (-1, -1)
        # 1-token updates take the native step while n_tokens < this, the group step at it
        self._fast_until = -1
        self._fast_state: Any = None  # the state when the last update took the native step
        self._out: torch.Tensor | None = None  # the state's attention output

    def __repr__(self) -> str:
        return f"QuantizedLayer({self.kind}, {self.get_seq_length()} tokens)"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.group is None:
            self.group = kivi_group(d)
        if d % self.group:
            raise ValueError(
                f"kv_type {self.kind}: head_dim {d} is not a multiple of {self.group} "
                f"(the cache groups {self.group} values along head_dim)"
            )
        if value_states.shape[-1] != d:
            raise ValueError(f"keys have head_dim {d} but values {value_states.shape[-1]}")
        if self.kivi and self.sinks >= self.group:
            raise ValueError(
                f"kv_sinks {self.sinks} must be smaller than the KIVI group ({self.group} tokens)"
            )
        if self.rotation and d & (d - 1):
            raise ValueError(f"kv_rotation needs a power-of-two head_dim, got {d}")
        self.batch_size = b
        room = self.sinks + self.residual + self.group if self.kivi else 0
        self.fp_k = key_states.new_empty(b, h, room, d)
        self.fp_v = value_states.new_empty(b, h, room, d)
        self.n_res = 0
        self._res_views = None
        self._drop_state()
        self.is_initialized = True

    # ------------------------------------------------------------------------------ appending
    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        """x in the stored domain: rotated (float32 butterfly) when rotating, model dtype."""
        if not self.rotation:
            return x
        return rotate.wht(x).to(self.dtype)

    def _decode_write(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """The common KIVI decode step of a float32 model (one token, past the sinks, no group
        to quantize): the token (rotated) written straight into the full-precision buffers'
        numpy views, no tensors built. False when the step is not that case."""
        if not (self.kivi and k.shape[2] == 1 and self.n_tokens >= self.sinks):
            return False
        if self._quantized_after(self.n_tokens + 1) != self.n_quantized:
            return False
        if not (_plain_f32(k) and _plain_f32(v) and self.fp_k.dtype == torch.float32):
            return False
        fk, fv = self._residual_f32()
        at = self.sinks + self.n_res
        slot_k, slot_v = fk[:, :, at], fv[:, :, at]
        slot_k[...] = k.numpy()[:, :, 0]
        slot_v[...] = v.numpy()[:, :, 0]
        if self.rotation:  # in place in the buffers: one native call for keys and values
            rotate.wht_(slot_k, slot_v)
        self.n_res += 1
        self.n_tokens += 1
        return True

    def _back(self, x: torch.Tensor) -> torch.Tensor:
        """Stored rows rotated back (float32 arithmetic), in the model's dtype."""
        return rotate.wht(x).to(self.dtype) if self.rotation else x

    def _quantized_after(self, count: int) -> int:
        """Tokens in the quantized rows once `count` tokens exist (KIVI: whole groups with
        `residual` newer tokens after them)."""
        g = self.group
        return g * max(0, (count - self.residual) // g)

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._pending = None
        if self._decode_write(k, v):
            return
        k, v = self._rotated(k), self._rotated(v)
        if not self.kivi:
            self.k_rows.append(codecs.encode(self.kind, k, "k", self.group))
            self.v_rows.append(codecs.encode(self.kind, v, "v", self.group))
            self.n_quantized += k.shape[2]
            self.n_tokens += k.shape[2]
            return
        s, n0 = self.sinks, self.n_tokens
        total = n0 + k.shape[2]
        if n0 < s:  # sinks: kept in full precision for good
            m = min(s - n0, k.shape[2])
            self.fp_k[:, :, n0 : n0 + m] = k[:, :, :m]
            self.fp_v[:, :, n0 : n0 + m] = v[:, :, :m]
            k, v = k[:, :, m:], v[:, :, m:]
        self.n_tokens = total
        n, r = k.shape[2], self.n_res
        if n == 0:
            return
        quantized = self._quantized_after(total)
        at = s + r  # the residual's next free slot
        if quantized == self.n_quantized:  # no group to quantize: one write
            self.fp_k[:, :, at : at + n] = k
            self.fp_v[:, :, at : at + n] = v
            self.n_res = r + n
            return
        # tokens first .. total-1, first = max(S, n_quantized): the residual, then this call's
        first = max(s, self.n_quantized)
        if r:
            k = torch.cat([self.fp_k[:, :, s:at], k], dim=2)
            v = torch.cat([self.fp_v[:, :, s:at], v], dim=2)
        lo = self.n_quantized
        bk, bv = k[:, :, lo - first : quantized - first], v[:, :, lo - first : quantized - first]
        if lo < s:  # group 0: the sink slots take token S's values, outside the range
            bk = torch.cat([k[:, :, :1].expand(-1, -1, s, -1), k[:, :, : quantized - s]], dim=2)
            bv = torch.cat([v[:, :, :1].expand(-1, -1, s, -1), v[:, :, : quantized - s]], dim=2)
        self.k_rows.append(codecs.encode(self.kind, bk, "k", self.group))
        self.v_rows.append(codecs.encode(self.kind, bv, "v", self.group))
        if self._visible < quantized:  # the call's attention still reads these in full
            self._pending = (first, k, v)
        self.n_quantized = quantized
        self.n_res = total - quantized
        self.fp_k[:, :, s : s + self.n_res] = k[:, :, quantized - first :]
        self.fp_v[:, :, s : s + self.n_res] = v[:, :, quantized - first :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, st = self.n_tokens, self._state
        if (
            n < self._fast_until
            and st.push(key_states, value_states, self.n_quantized, self.sinks + self.n_res)
        ) or (n == self._fast_until and self._group_step(key_states, value_states)):
            # the common KIVI decode step: the token went into the residual natively (and, on
            # the step that completes a group, the group into the quantized rows); the
            # attention call reads the state (`attend`)
            self.n_res += 1
            self.n_tokens += 1
            self._visible = self.n_quantized
            self._pending = None
            if self.fast_decode():
                self._fast_state = self._state  # st, or the one a group step rebuilt
                return attention.tag(key_states, self), value_states
            self._fast_state = None
            return self.states_for_attention(key_states, value_states)
        self._fast_state = None
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # streaming semantics: the call's attention sees the groups quantized once its first
        # token was appended (a one-token decode step: after it)
        self._visible = self._quantized_after(self.n_tokens + 1) if self.kivi else 0
        self._append(key_states, value_states)
        if self._refresh_state() and key_states.shape[2] == 1 and self.fast_decode():
            self._fast_state = self._state if self._state_step(key_states, value_states) else None
        if key_states.shape[2] == 1 and key_states.is_cpu and self.fast_decode():
            # a decode step: attention.attention reads the quantized rows (attend_decode)
            return attention.tag(key_states, self), value_states
        return self.states_for_attention(key_states, value_states)

    def states_for_attention(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float keys and values attention reads after an update with `key_states` /
        `value_states` (views into the shared workspace)."""
        out_k, out_v = self._materialize()
        self._pending = None
        if self.kivi:
            # streaming semantics: the tokens of this call attend to each other in full
            # precision, as they would one token at a time (each waits in the residual)
            n = key_states.shape[2]
            out_k[:, :, -n:] = key_states
            out_v[:, :, -n:] = value_states
        return out_k, out_v

    # ------------------------------------------------------------------------------- reading
    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, _, d = self.fp_k.shape
        total = self.n_tokens
        nq = self._visible if self.kivi else self.n_quantized
        out_k, out_v = self.workspace.get((b, h, total, d), self.dtype, self.device)
        if nq:
            kp, vp = self.k_rows.view(), self.v_rows.view()
            if self.kivi:  # a prefix of the rows: keys are rows of whole groups
                kp = {name: t[:, :, : nq // self.group] for name, t in kp.items()}
                vp = {name: t[:, :, :nq] for name, t in vp.items()}
            if self.dtype == torch.float32 and not self.rotation:
                codecs.decode(self.kind, kp, out_k[:, :, :nq], "k", self.group)
                codecs.decode(self.kind, vp, out_v[:, :, :nq], "v", self.group)
            else:  # decode in float32 (the formats' arithmetic), rotate back, model dtype
                tmp_k, tmp_v = self.workspace.get((b, h, nq, d), torch.float32, self.device)
                codecs.decode(self.kind, kp, tmp_k, "k", self.group)
                codecs.decode(self.kind, vp, tmp_v, "v", self.group)
                out_k[:, :, :nq].copy_(self._back(tmp_k))
                out_v[:, :, :nq].copy_(self._back(tmp_v))
        if not self.kivi:
            return out_k, out_v
        s = min(self.sinks, total)
        if s:
            out_k[:, :, :s].copy_(self._back(self.fp_k[:, :, :s]))
            out_v[:, :, :s].copy_(self._back(self.fp_v[:, :, :s]))
        lo = max(self.sinks, nq)  # tokens lo .. total-1 in full precision
        if lo < total:
            if self._pending is not None:  # some of them were quantized by this call
                first, pk, pv = self._pending
                src_k, src_v = pk[:, :, lo - first :], pv[:, :, lo - first :]
            else:
                at = self.sinks + lo - max(self.sinks, self.n_quantized)
                src_k = self.fp_k[:, :, at : self.sinks + self.n_res]
                src_v = self.fp_v[:, :, at : self.sinks + self.n_res]
            out_k[:, :, lo:].copy_(self._back(src_k))
            out_v[:, :, lo:].copy_(self._back(src_v))
        return out_k, out_v

    def attend_decode(
        self,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        reference: bool = False,
    ) -> torch.Tensor:
        """One decode step's attention output (batch, 1, heads, head_dim) over the quantized
        rows, read in place, and the full-precision tail: the KIVI sinks and residual, or, on
        the step that completed a group with no residual window, the step's own token (as
        `states_for_attention` returns it). Kernel positions: the quantized rows, then the
        tail; the sink slots of the rows are masked out (their codes are token S's).
        With rotation the query goes in rotated and the output comes out rotated back.
        `reference`: the native scalar reference kernel (bit-identical to the SIMD one; tests).

        Called once per layer per decode step, so the per-call Python work is kept small: the
        buffers' byte views and the residual's float32 views are cached until they change."""
        self._pending = None
        b, hq, _, d = query.shape
        n_quant = self.n_quantized
        s = min(self.sinks, self.n_tokens)
        if not self.kivi:
            tail_k = tail_v = self._no_tail(b, d)
            n_tail = 0
        elif self.n_res or not n_quant:
            tail_k, tail_v = self._residual_f32()
            n_tail = s + self.n_res
        else:  # this step filled a group (no window): its token is attended in full precision
            now_k = self._rotated(key_states).float().numpy()
            now_v = self._rotated(value_states).float().numpy()
            fk, fv = self._residual_f32()
            tail_k = np.ascontiguousarray(np.concatenate([fk[:, :, :s], now_k], axis=2))
            tail_v = np.ascontiguousarray(np.concatenate([fv[:, :, :s], now_v], axis=2))
            n_quant -= 1
            n_tail = s + 1
        kernel_mask = None if mask is None else mask.numpy()
        if self.kivi and s and n_quant:  # positions: rows 0..n_quant-1, sinks, the rest
            if kernel_mask is None:
                kernel_mask = self._sink_mask(b, n_quant + n_tail, s)
            else:
                m = kernel_mask
                kernel_mask = np.concatenate([m[:, :n_quant], m[:, :s], m[:, n_quant:]], axis=1)
                kernel_mask[:, :s] = 0
        q = query.reshape(b, hq, d)
        if q.dtype != torch.float32:
            q = q.float()
        q = q.contiguous().numpy()
        out = np.empty((b, hq, d), dtype=np.float32)
        names = PART_NAMES[self.kind]
        _native.kv_attend_decode(
            self.kind,
            (
                self.group,
                b,
                self.fp_k.shape[1],
                d,
                hq,
                n_quant,
                self.k_rows.cap,
                self.v_rows.cap,
                tail_k.shape[2],
                n_tail,
            ),
            self.k_rows.byte_views(names),
            self.v_rows.byte_views(names),
            tail_k,
            tail_v,
            q,
            float(scale),
            out,
            kernel_mask,
            reference,
            self.rotation,  # the query rotated and the output rotated back in the call
        )
        out = torch.from_numpy(out).view(b, 1, hq, d)
        return out if query.dtype == torch.float32 else out.to(query.dtype)

    def _sink_mask(self, b: int, positions: int, s: int) -> np.ndarray:
        """The kernel mask without padding: the rows' s sink slots 0, everything else 1 (for
        batch 1 a slice of a cached buffer: one decode step, one slice)."""
        if b != 1:
            m = np.ones((b, positions), dtype=np.uint8)
            m[:, :s] = 0
            return m
        have = self._mask_buf
        if have is None or have.shape[1] < positions:
            cap = max(positions, 2 * (0 if have is None else have.shape[1]))
            have = np.ones((1, cap), np.uint8)
            have[:, :s] = 0
            self._mask_buf = have
        return have[:, :positions]

    def _residual_f32(self) -> tuple[Any, Any]:
        """The full-precision buffers (sinks, residual) as float32 numpy arrays: views of the
        buffers themselves (cached) for a float32 model, converted copies otherwise."""
        if self.fp_k.dtype != torch.float32:
            return self.fp_k.float().numpy(), self.fp_v.float().numpy()
        if self._res_views is None:
            self._res_views = (self.fp_k.numpy(), self.fp_v.numpy())
        return self._res_views

    def _no_tail(self, b: int, d: int) -> Any:
        """An empty (b, heads, 0, d) float32 tail (per-token types have no residual)."""
        if self._res_views is None:
            self._res_views = (np.empty((b, self.fp_k.shape[1], 0, d), dtype=np.float32),) * 2
        return self._res_views[0]

    def stored_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The quantized keys' and values' stored parts (views; for tests and inspection)."""
        return self.k_rows.view(), self.v_rows.view()

    def nbytes(self) -> int:
        """Bytes held: the quantized rows plus the full-precision sinks and residual."""
        res = 0
        if self.fp_k is not None and self.kivi:
            per_token = self.fp_k[:, :, :1].numel() * self.fp_k.element_size()
            res = 2 * (min(self.sinks, self.n_tokens) + self.n_res) * per_token
        return self.k_rows.nbytes() + self.v_rows.nbytes() + res

    # ------------------------------------------------------------------ the Cache layer API
    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k_rows, self.v_rows = _Rows(), _Rows()
        self.n_tokens = self.n_quantized = 0
        self.fp_k = self.fp_v = None
        self.n_res = 0
        self._res_views = None
        self._visible, self._pending = 0, None
        self._drop_state()
        self.is_initialized = False

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        self.k_rows.map_batch(fn)
        self.v_rows.map_batch(fn)
        self.fp_k, self.fp_v = fn(self.fp_k), fn(self.fp_v)
        self._res_views = None
        self._pending = None
        self._drop_state()
        self._refresh_state()
        self.batch_size = self.fp_k.shape[0]

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
    forward with `use_cache=True`. One cache serves one generation (call `reset()` to reuse).

    `kv_sinks` / `kv_residual` (KIVI types; default: `int2` 4 / 128, `int4` 0 / 0): the first
    `kv_sinks` tokens stay in full precision and out of their group's range, and a key group is
    quantized only once `kv_residual` newer tokens exist. `kv_rotation` (default: on for `int2`,
    off for the others): rows are stored Walsh-Hadamard rotated per head (head_dim a power of
    two). The sinks are the first positions of the cache: with left padding, pad positions.

    `fast_decode` (default): decode steps attend on the quantized rows in place; for that the
    cache sets an sdpa `config`'s attention implementation to `ferroquant_kv` (attention.py:
    sdpa for every call that is not such a step, so other caches see no change)."""

    def __init__(
        self,
        config: Any,
        kv_type: str = "int4",
        fast_decode: bool = True,
        kv_sinks: int | None = None,
        kv_residual: int | None = None,
        kv_rotation: bool | None = None,
    ) -> None:
        kind = _kv_type_name(kv_type)
        sinks, residual = kv_window(kind, kv_sinks, kv_residual)
        if kv_rotation is not None and not isinstance(kv_rotation, bool):
            raise ValueError(f"kv_rotation must be True, False or None, got {kv_rotation!r}")
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(
                f"QuantizedCache supports full-attention layers only; the config has {other}"
            )
        shape = kv_shape(text_config)
        n_head = getattr(text_config, "num_attention_heads", None)
        self.kv_type = kind
        self.kv_sinks, self.kv_residual = sinks, residual
        self.workspace = _Workspace()
        if fast_decode:
            # decode steps read the quantized rows in place (attention.py). `ferroquant_kv` is
            # sdpa for everything that is not our decode step, so only an sdpa config (the CPU
            # default) is switched; eager / flash configs keep their attention and this path.
            attention.register()
            if getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = attention.NAME
        # `fast_decode=False` must not follow the config: an earlier fast cache may already have
        # switched it to `ferroquant_kv` (then a "slow" cache took the native decode too)
        uses_fast = _uses_ferroquant_kv(config) if fast_decode else _never
        layers = [
            QuantizedLayer(
                kind,
                self.workspace,
                uses_fast,
                sinks=sinks,
                residual=residual,
                rotation=kv_rotation,
                n_head=n_head if isinstance(n_head, int) else None,
            )
            for _ in range(shape.n_layer)
        ]
        self.kv_rotation = layers[0].rotation if layers else bool(kv_rotation)
        super().__init__(layers=layers)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`Cache.update` without its per-call checks for layers to create and offloading
        (this cache has all its layers and does not offload): called per layer and step."""
        if getattr(self, "offloading", False):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes the cache holds now (quantized rows and residuals; the transient workspace
        excluded, see `workspace_nbytes`)."""
        return sum(layer.nbytes() for layer in self.layers)

    def workspace_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.workspace.bufs.values() for t in p)


def _never() -> bool:
    """A `fast_decode=False` cache's layers: never the native decode."""
    return False


def _uses_ferroquant_kv(config: Any) -> Callable[[], bool]:
    """Is `config`'s attention `ferroquant_kv` now? Asked once per layer per step, so read from
    the attribute transformers' `_attn_implementation` property returns (a plain dict lookup;
    the property through PretrainedConfig's attribute hooks costs about 1.5 us)."""
    fields = getattr(config, "__dict__", {})
    if "_attn_implementation_internal" in fields:
        return lambda: fields.get("_attn_implementation_internal") == attention.NAME
    return lambda: config._attn_implementation == attention.NAME


def _kv_type_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"kv_type must be a string naming a type, got {type(name).__name__}")
    return kv_type(name).name
