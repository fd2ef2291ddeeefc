"""The cache's storage pieces: the growing buffers of one role's stored parts (`_Rows`) and the
one full-precision workspace a cache's layers decode into (`_Workspace`); see cache.py."""

from __future__ import annotations

from typing import Any

import torch

from . import attention


class _Rows:
    """The stored parts of one role (keys or values) of one layer, appended along dim 2."""

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}
        self.n = 0  # rows used
        self.cap = 0  # rows allocated
        self.gen = 0  # counts the replacements of the buffers (a native state views them)
        self._bytes: dict[str, Any] = {}  # numpy byte views of the buffers (the native path)

    def append(self, new: dict[str, torch.Tensor]) -> None:
        k = next(iter(new.values())).shape[2]
        if k == 0:
            return
        if not self.parts:
            self.parts = {name: _with_capacity(t, max(k, 4)) for name, t in new.items()}
            self.cap = max(k, 4)
            self._bytes = {}  # views cached while empty (decode steps before the first group)
            self.gen += 1
        else:
            self.reserve(k)
        for name, t in new.items():
            self.parts[name][:, :, self.n : self.n + k] = t
        self.n += k

    def reserve(self, k: int) -> None:
        """Room for `k` more rows (the capacity at least doubled when it grows), so that a
        native writer (`KvLayerState.push_group`) can fill them in place; the caller then counts
        them in `n`. Nothing to do before the first append (no buffers yet)."""
        if self.parts and self.n + k > self.cap:
            self.cap = max(self.n + k, 2 * self.cap)
            self.parts = {name: _grow(t, self.n, self.cap) for name, t in self.parts.items()}
            self._bytes = {}
            self.gen += 1

    def byte_views(self, names: tuple[str, ...]) -> list[Any]:
        """The buffers `names` (whole capacity) as flat uint8 numpy views, three entries
        (empty arrays where a type has fewer parts); cached until the buffers change."""
        have = self._bytes.get(names)
        if have is None:
            have = [attention.as_bytes(self.parts.get(n)) for n in names]
            have += [attention.as_bytes(None)] * (3 - len(names))
            self._bytes = {names: have}
        return have

    def capacity(self) -> int:
        return self.cap

    def view(self) -> dict[str, torch.Tensor]:
        return {name: t[:, :, : self.n] for name, t in self.parts.items()}

    def nbytes(self) -> int:
        return sum(t[:, :, : self.n].numel() * t.element_size() for t in self.parts.values())

    def map_batch(self, fn: Any) -> None:
        self.parts = {name: fn(t) for name, t in self.parts.items()}
        self._bytes = {}
        self.gen += 1


def _plain_f32(t: torch.Tensor) -> bool:
    """A float32 CPU tensor numpy can view (no autograd)."""
    return t.dtype == torch.float32 and t.is_cpu and not t.requires_grad


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


# the stored parts of each type in the order the native attention takes them (main, scale, zero)
PART_NAMES = {
    "f32": ("x",),
    "f16": ("x",),
    "q8_0": ("qs", "d"),
    "q4_0": ("qs", "d"),
    "fp8_e4m3": ("q", "scale"),
    "int4": ("q", "scale", "zero"),
    "int2": ("q", "scale", "zero"),
}
