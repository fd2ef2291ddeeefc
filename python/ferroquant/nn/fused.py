"""Fused QuantLinear calls: sibling QuantLinears that read the same input (an attention's q/k/v,
an MLP's gate/up) run as ONE native call on their weights stacked row-wise.

Why: at a prompt's rows SmolLM2's Linears are small (576x192 k/v), so a call's fixed costs (the
Python wrapper, the activation preparation, the kernel plan, the team's parallel region) weigh
as much as its GEMM. Stacked, the 7 calls of a decoder layer become 4.

How: `fuse_linears(model)` stacks each group's `qweight` / `qstats` into one buffer and makes the
members' buffers views of it (no extra weight memory; checkpoints still hold each member's own
tensors: `QuantLinear._save_to_state_dict`). The first member called with an input computes every
member's output (`_native.qmatmul_bf16_split`: each output the bits of that member's own call)
and keeps the others' for their own call with the same input tensor (same object, and same
version where the tensor has one: an inference-mode tensor has none, so an input modified in
place between the siblings' calls is not detected); any other call runs the member alone.
A group whose waiting outputs go unused (`MAX_DROPPED` times: the members read different
inputs, as in a cross-attention) stops fusing. A member whose buffers were replaced (a
load_state_dict, a move to another device) no longer matches its group: every member then runs
alone.
Scope: bf16 activations on the CPU in eager mode (QuantLinear's direct path); other dtypes,
autograd, compile and tracing take each member's own call.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from .. import _native
from . import ops
from .linear import bf16_rows
from .openmp import torch_team

# Sibling names whose modules read the same input in the transformers models (Llama, Mistral,
# Qwen, Gemma, Phi-3's split variants: q/k/v and gate/up; BERT-like: query/key/value).
GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


# A group whose waiting outputs were dropped this many times stops fusing: its members do not
# read one input (a cross-attention's k/v read the encoder's states, q the decoder's).
MAX_DROPPED = 2


class FusedGroup:
    """The stacked weight of sibling QuantLinears and the outputs waiting for their call."""

    def __init__(self, members: list[Any]) -> None:
        first = members[0]
        self.members = members
        self.qtype, self.block_size = first.qtype, first.block_size
        self.scale_mode = first.scale_mode or None
        self.k = first.in_features
        self.parts = [m.out_features for m in members]
        # (plain tensors even under inference_mode: QuantLinear reads their versions)
        with torch.inference_mode(False):
            w = torch.cat([m.qweight.detach().reshape(-1) for m in members])
            s = torch.cat([m.qstats.detach().to(torch.float32).reshape(-1) for m in members])
            wo = so = 0
            self.buffers = []
            for m in members:
                nw, ns = m.qweight.numel(), m.qstats.numel()
                m.qweight = w[wo : wo + nw].view(m.qweight.shape)
                m.qstats = s[so : so + ns].view(m.qstats.shape)
                m._np_cache = None
                self.buffers.append((m.qweight, m.qstats))
                wo, so = wo + nw, so + ns
        self.w, self.s = w.numpy(), s.numpy()
        self._local = threading.local()  # each thread's waiting outputs
        self.dropped = 0  # fused calls whose waiting outputs nobody took (see `call`)

    def intact(self) -> bool:
        """True while every member still holds the views made here."""
        for m, (w, s) in zip(self.members, self.buffers, strict=True):
            b = m._buffers
            if b["qweight"] is not w or b["qstats"] is not s:
                return False
        return True

    def call(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member i's output for x (from the waiting ones, else one fused call), or None when
        the member must run alone."""
        version = None if x.is_inference() else x._version
        st = getattr(self._local, "waiting", None)
        if st is not None and st[0] is x and st[1] == version and st[2][i] is not None:
            y = st[2][i]
            st[2][i] = None
            if all(o is None for o in st[2]):
                self._local.waiting = None
            return y
        if st is not None:  # outputs computed for nothing: the siblings read other inputs
            self._local.waiting = None
            self.dropped += 1
        if x.dtype != torch.bfloat16 or self.dropped >= MAX_DROPPED or not self.intact():
            return None
        ys = self._forward(x)
        y = ys[i]
        ys[i] = None
        self._local.waiting = (x, version, ys) if any(o is not None for o in ys) else None
        return y

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        team = torch_team()
        ys = _native.qmatmul_bf16_split(bf16_rows(x, self.k), self.w, self.qtype, self.parts,
                                        self.k, self.block_size, self.s, self.scale_mode,
                                        openmp=team)  # fmt: skip
        return [m.bf16_out(x, y, team) for m, y in zip(self.members, ys, strict=True)]


def fusable(members: list[Any]) -> bool:
    """True when `members` (QuantLinears) can share one stacked weight: one CPU format with a
    native kernel, the same input width and block layout, statistics that stack (not one scale
    for a whole tensor), every weight made of whole blocks."""
    first = members[0]
    return (
        all(
            m.qtype == first.qtype
            and m.block_size == first.block_size
            and (m.scale_mode or None) == (first.scale_mode or None)
            and m.in_features == first.in_features
            and m.qweight.device.type == "cpu"
            and m.qstats.device.type == "cpu"
            and not m.__dict__.get("kernel_layout", False)
            and (m.out_features * m.in_features) % max(1, m.block_size) == 0
            for m in members
        )
        and (first.scale_mode or None) != "tensor"
        and first.qtype in ops._NATIVE_QTYPES
    )


def fuse_linears(model: nn.Module) -> int:
    """Fuse every group of sibling QuantLinears of `model` named in `GROUPS` (all of a group
    present and `fusable`); returns how many groups were fused. Outputs are bit-identical to
    the unfused calls."""
    from .linear import QuantLinear

    count = 0
    for parent in model.modules():
        children = parent._modules
        for names in GROUPS:
            members = [children.get(n) for n in names]
            if not all(isinstance(m, QuantLinear) for m in members) or not fusable(members):
                continue
            f = members[0].__dict__.get("_fused")
            if f is not None and f[0].members == members and f[0].intact():
                continue  # already fused
            group = FusedGroup(members)
            for i, m in enumerate(members):
                m._fused = (group, i)
            count += 1
    return count
