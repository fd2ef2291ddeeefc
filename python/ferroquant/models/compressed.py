"""compressed-tensors checkpoints (llm-compressor's output, `quant_method: compressed-tensors`,
`format: pack-quantized`) -> ferroquant's grouped integer tensors, without requantizing.

The format (compressed_tensors/compressors/pack_quantized, 0.19): per quantized Linear
- `weight_packed` int32 [N, ceil(K * bits / 32)]: each output row's K codes, stored as
  `q + 2^(bits-1)` (unsigned), one little-endian bit stream along the input dimension (32 codes in
  `bits` words; codes straddle words);
- `weight_scale` [N, groups] (the model's float dtype); `weight_shape` int64 [2] = (N, K);
- asymmetric only: `weight_zero_point` int32 [ceil(N * bits / 32), groups], the signed zero
  points plus 2^(bits-1), packed the same way along the output dimension;
- `weight_g_idx` only with `actorder: group` (permuted groups: refused).
compressed-tensors dequantizes `(q - zp) * scale`; with unsigned codes `c = q + 2^(bits-1)` and
`z = zp + 2^(bits-1)` that is ferroquant's `scale * (c - z)`, so the codes, zeros and scales are
copied as they are: strategy "group" (32/64/128) -> `int{bits}_g{group}[_sym]`, "channel" ->
`int{bits}_gch[_sym]`. Anything else (activation quantization, float weights, other formats, a
group ferroquant has no qtype for) is a FormatError naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._native import FormatError
from ..tensor import QTensor
from . import packed_int

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"


@dataclass(frozen=True)
class WeightScheme:
    """One config group's weight quantization, as ferroquant reads it."""

    targets: tuple[str, ...]
    bits: int
    group: int  # 0: per channel
    sym: bool


def read_schemes(qc: dict[str, Any], path: Path) -> tuple[list[WeightScheme], tuple[str, ...]]:
    """The weight schemes of a compressed-tensors quantization_config and its ignore list;
    FormatError for anything ferroquant cannot hold exactly."""
    where = f"{path}: quantization_config"
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise FormatError(f"{where}.quantization_status is {status!r}; only 'compressed' "
                          "checkpoints hold packed weights")  # fmt: skip
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{where}.config_groups is missing or empty")
    out = []
    for gname, g in groups.items():
        at = f"{where}.config_groups.{gname}"
        fmt = g.get("format") or qc.get("format")
        if fmt != FORMAT:
            raise FormatError(f"{at}.format is {fmt!r}; ferroquant reads {FORMAT!r} (W4A16 & co.)")
        if g.get("input_activations") or g.get("output_activations"):
            raise FormatError(f"{at}: activation quantization is not supported (weights only)")
        w = g.get("weights") or {}
        if w.get("type", "int") != "int" or w.get("dynamic", False):
            raise FormatError(
                f"{at}.weights: type {w.get('type')!r} / dynamic {w.get('dynamic')!r}; "
                "ferroquant reads static int weights"
            )
        strategy = w.get("strategy")
        if strategy == "group":
            group = int(w.get("group_size") or 0)
        elif strategy == "channel":
            group = 0
        else:
            raise FormatError(
                f"{at}.weights.strategy {strategy!r} is not supported (group, channel)"
            )
        if w.get("actorder") == "group":
            raise FormatError(
                f"{at}.weights.actorder is 'group' (permuted groups, weight_g_idx); ferroquant's "
                "grouped integers keep groups contiguous ('static' or none is fine)"
            )
        targets = tuple(str(t) for t in g.get("targets") or ())
        out.append(WeightScheme(targets, int(w["num_bits"]), group, bool(w.get("symmetric"))))
    return out, tuple(str(i) for i in qc.get("ignore") or ())


def _matches(pattern: str, name: str, module: Any) -> bool:
    """compressed-tensors' target rule: "re:<regex>" on the module name, else the class name or
    the exact module name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (type(module).__name__, name)


def scheme_for(name: str, module: Any, schemes: list[WeightScheme],
               ignore: tuple[str, ...]) -> WeightScheme | None:  # fmt: skip
    if any(_matches(p, name, module) for p in ignore):
        return None
    for s in schemes:
        if any(_matches(t, name, module) for t in s.targets):
            return s
    return None


def decode_module(t: dict[str, Any], s: WeightScheme, name: str) -> QTensor:
    """The gint QTensor of one module's packed tensors (numpy or torch)."""
    packed = packed_int._np(t["weight_packed"])
    scale = packed_int._np(t["weight_scale"]).astype(np.float32)
    shape = tuple(int(v) for v in packed_int._np(t["weight_shape"]).reshape(-1))
    if len(shape) != 2 or packed.ndim != 2 or packed.dtype != np.int32:
        raise FormatError(f"{name}: weight_packed {packed.dtype} {packed.shape} with weight_shape "
                          f"{shape} is not a packed 2-D Linear weight")  # fmt: skip
    n, k = shape
    groups = 1 if s.group == 0 else (k // s.group if s.group and k % s.group == 0 else -1)
    if groups < 1:
        raise FormatError(f"{name}: group size {s.group} does not divide the rows of {k}")
    if packed.shape != (n, -(-k * s.bits // 32)) or scale.shape != (n, groups):
        raise FormatError(
            f"{name}: weight_packed {packed.shape} / weight_scale {scale.shape} do not fit "
            f"{n}x{k} weights of {s.bits} bits in {groups} groups"
        )
    codes = packed_int._stream_unpack(packed, s.bits, k, 1)
    if s.sym:
        zeros = np.full((n, groups), 1 << (s.bits - 1), np.int64)
    else:
        if "weight_zero_point" not in t:
            raise FormatError(f"{name}: asymmetric weights without weight_zero_point")
        zp = packed_int._np(t["weight_zero_point"])
        if zp.dtype != np.int32 or zp.shape != (-(-n * s.bits // 32), groups):
            raise FormatError(f"{name}: weight_zero_point {zp.dtype} {zp.shape} does not fit "
                              f"{n} rows x {groups} groups")  # fmt: skip
        zeros = packed_int._stream_unpack(zp, s.bits, n, 0)
    return packed_int._qtensor(codes, scale, zeros, s.bits, s.group or -1, s.sym)


SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
