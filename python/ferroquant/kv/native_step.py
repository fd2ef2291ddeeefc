"""The native decode step of a `QuantizedLayer` (cache.py): building the layer's
`_native.KvLayerState` on its buffers and the bookkeeping around its calls (`push` and
`push_group` from `update`, `ready` after a step the Python path appended). A mixin: the state
lives in the layer's attributes (`_state`, `_state_gen`, `_fast_until`, `_fast_state`, `_out`)."""

from __future__ import annotations

from typing import Any

import torch

from .. import _native
from .buffers import PART_NAMES


class NativeStep:
    """`QuantizedLayer`'s methods around its native decode state (see the module docstring)."""

    # the layer's attributes these methods read and write (set by QuantizedLayer.__init__)
    _state: Any
    _state_gen: tuple[int, int]
    _fast_until: int
    _fast_state: Any
    _out: torch.Tensor | None

    def _refresh_state(self) -> bool:
        """After an update on the general path: (re)build the native state where the next
        one-token updates can take it (a KIVI type of a float32 CPU model, past the sinks) and
        set how long they can (until a key group is due: the next token count that quantizes
        one). True when the state is usable."""
        self._fast_until = -1
        fp = self.fp_k
        if not (
            self.kivi
            and self.n_head
            and fp is not None
            and fp.dtype == torch.float32
            and fp.is_cpu
            and self.n_head % fp.shape[1] == 0
            and self.n_tokens >= self.sinks
        ):
            return False
        gen = (self.k_rows.gen, self.v_rows.gen)
        if self._state is None or self._state_gen != gen:
            self._state = self._build_state()
            self._state_gen = gen
        self._fast_until = self.n_quantized + self.group + self.residual - 1
        return True

    def _group_step(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """The one-token step that completes a key group, natively (`KvLayerState.push_group`:
        the same stored bytes as `_append`): the buffers grown first where the group does not
        fit (the state rebuilt on them); the rows' and the residual's counts follow (the caller
        counts the token). False where the state declines (no quantized rows yet, group 0 under
        sinks, other tensors): `_append` quantizes the group."""
        g, kr, vr = self.group, self.k_rows, self.v_rows
        if kr.parts and (kr.n + 1 > kr.cap or vr.n + g > vr.cap):
            kr.reserve(1)
            vr.reserve(g)
            self._state, self._state_gen = self._build_state(), (kr.gen, vr.gen)
        if not self._state.push_group(k, v, self.n_quantized, self.n_res):
            return False
        self.k_rows.n += 1
        self.v_rows.n += g
        self.n_quantized += g
        self.n_res -= g
        self._fast_until += g
        return True

    def _state_step(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """A one-token step the Python path appended (it quantized a group): let the state's
        `attend` read it as `attend_decode` would. Without a residual window the step's own token
        (the last of the group just quantized) is attended in full precision: `push` writes it
        into the free residual slot after the sinks."""
        if self.n_res or not self.n_quantized:
            return self._state.ready(self.n_quantized, self.sinks + self.n_res)
        return self._state.push(k, v, self.n_quantized - 1, self.sinks)

    def _build_state(self) -> Any:
        b, h, cap, d = self.fp_k.shape
        out = self._out
        if out is None or tuple(out.shape) != (b, 1, self.n_head, d):
            out = self._out = torch.empty(b, 1, self.n_head, d, dtype=torch.float32)
        names = PART_NAMES[self.kind]
        fk, fv = self._residual_f32()
        geometry = (self.group, b, h, d, self.n_head, self.k_rows.cap, self.v_rows.cap, cap)
        return _native.KvLayerState(
            self.kind,
            (*geometry, self.sinks),
            self.k_rows.byte_views(names),
            self.v_rows.byte_views(names),
            fk,
            fv,
            self.rotation,
            torch.float32,
            out,
        )

    def _drop_state(self) -> None:
        self._state, self._fast_state, self._out = None, None, None
        self._state_gen = (-1, -1)
        self._fast_until = -1
