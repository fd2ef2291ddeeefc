"""The CUDA op's fallback: dequantize on the GPU with torch operations, then F.linear (cuBLAS).
It runs when the kernels cannot take a call (a format without a kernel, float32 activations, a
shape outside the kernels' limits, no NVRTC, a GPU older than sm_80), warned once per reason, and
never copies anything through host memory per call.

The decoders below repeat ggml's / bitsandbytes' arithmetic with separately rounded torch
operations, so on any device they give `ferroquant.dequantize`'s float32 bits (tests check every
one against it on the CPU). Formats without a decoder here (q4_1, q5_0, q5_1, q2_k, q3_k,
iq4_nl, iq4_xs) are dequantized once by the Rust reference and kept on the GPU as float32, keyed
weakly by the weight tensor: one upload per weight, never one per call.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch

_warned: set[str] = set()


def warn_once(reason: str) -> None:
    """One warning per distinct reason for the life of the process."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"ferroquant CUDA: {reason}; computing with dequantize on the GPU + torch matmul",
            RuntimeWarning,
            stacklevel=4,
        )


# ---- decoders (ggml / bitsandbytes layouts, any torch device) ---------------------------------


def _half(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian halves -> float32 [...] (exact)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _blocks(data: torch.Tensor, type_size: int) -> torch.Tensor:
    return data.reshape(-1, type_size)


def _q4_0(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = _blocks(data, 18)
    d = _half(b[:, 0:2]).unsqueeze(1)
    qs = b[:, 2:].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=1) - 8
    return (q.float() * d).reshape(n, k)


def _q8_0(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = _blocks(data, 34)
    d = _half(b[:, 0:2]).unsqueeze(1)
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(n, k)


def _k4_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml get_scale_min_k4 for j = 0..7 over [blocks, 12] uint8 -> (scales, mins) [blocks, 8]."""
    s = sc.to(torch.int32)
    lo_d, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_d = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_d, hi_d], 1), torch.cat([lo_m, hi_m], 1)


def _kquant(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """q4_K / q5_K: q [blocks, 8, 32] unsigned quants of the 8 sub-blocks -> d*sc*q - dmin*m."""
    d = _half(b[:, 0:2]).unsqueeze(1)
    dmin = _half(b[:, 2:4]).unsqueeze(1)
    sc, mn = _k4_scales(b[:, 4:16])
    d1 = (d * sc.float()).unsqueeze(2)
    m1 = (dmin * mn.float()).unsqueeze(2)
    return d1 * q.float() - m1


def _q4_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = _blocks(data, 144)
    qs = b[:, 16:].to(torch.int32).reshape(-1, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)
    return _kquant(q, b).reshape(n, k)


def _q5_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = _blocks(data, 176)
    qh = b[:, 16:48].to(torch.int32)  # [blocks, 32]
    qs = b[:, 48:].to(torch.int32).reshape(-1, 4, 32)
    bit = torch.arange(8, device=data.device, dtype=torch.int32).reshape(1, 8, 1)
    high = ((qh.unsqueeze(1) >> bit) & 1) << 4  # [blocks, 8, 32]: bit j of qh[l] for sub-block j
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32) + high
    return _kquant(q, b).reshape(n, k)


def _q6_k(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = _blocks(data, 210)
    ql = b[:, 0:128].to(torch.int32).reshape(-1, 2, 2, 32)  # [blk, half, lo/hi 32, l]
    qh = b[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [blk, 16]
    d = _half(b[:, 208:210])
    # (arange, not torch.tensor: made on the device, no host-to-device copy per call)
    shift = torch.arange(0, 8, 2, device=data.device, dtype=torch.int32).reshape(1, 1, 4, 1)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # [blk, half, 4 quarters, 32]
    q = (low | (((qh >> shift) & 3) << 4)) - 32
    # quarter g of half h, element l uses scale 8h + 2g + l // 16
    scale = (d.reshape(-1, 1) * sc).reshape(-1, 2, 4, 2, 1)  # (d * sc) first, as ggml
    y = scale * q.reshape(-1, 2, 4, 2, 16).float()
    return y.reshape(n, k)


def _bnb4(code: torch.Tensor) -> Callable[..., torch.Tensor]:
    on_device: dict[torch.device, torch.Tensor] = {}  # the code copied to each device once

    def dec(data: torch.Tensor, stats: torch.Tensor, n: int, k: int, block_size: int):
        p = data.reshape(-1).to(torch.int64)
        q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)  # element 2j: the high nibble
        table = on_device.get(data.device)
        if table is None:
            table = on_device[data.device] = code.to(data.device)
        c = table[q].reshape(-1, block_size)
        return (c * stats.reshape(-1, 1).float()).reshape(n, k)

    return dec


def _scaled(fp8: torch.dtype | None) -> Callable[..., torch.Tensor]:
    def dec(data, stats, n, k, block_size, scale_mode):
        flat = data.reshape(-1)
        v = flat.view(torch.int8).float() if fp8 is None else flat.view(fp8).float()
        s = stats.reshape(-1).float()
        mode = scale_mode or "row"
        if mode == "tensor":
            return (v * s).reshape(n, k)
        per = k if mode == "row" else block_size
        return (v.reshape(-1, per) * s.reshape(-1, 1)).reshape(n, k)

    return dec


_NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)  # fmt: skip
# bitsandbytes' FP4 code (functional.py get_4bit_type("fp4")): the raw values / 12 in float32
_FP4 = (
    torch.tensor(
        [
            0.0,
            0.0625,
            8.0,
            12.0,
            4.0,
            6.0,
            2.0,
            3.0,
            0.0,
            -0.0625,
            -8.0,
            -12.0,
            -4.0,
            -6.0,
            -2.0,
            -3.0,
        ],
        dtype=torch.float32,
    )
    / 12.0
)

_GGML = {"q4_0": _q4_0, "q8_0": _q8_0, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}
_BNB = {"nf4": _bnb4(_NF4), "fp4": _bnb4(_FP4)}
_SCALED = {"int8": _scaled(None), "fp8_e4m3": _scaled(torch.float8_e4m3fn),
           "fp8_e5m2": _scaled(torch.float8_e5m2)}  # fmt: skip
_PLAIN = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DECODED = frozenset(_GGML) | frozenset(_BNB) | frozenset(_SCALED) | frozenset(_PLAIN)

_dense: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def dequantize(
    data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int, block_size: int,
    scale_mode: str,
) -> torch.Tensor:  # fmt: skip
    """W (n x k) float32 on data's device, bit-identical to ferroquant.dequantize. `data` in the
    reference layout (the caller undoes the GPU split layout)."""
    if qtype in _GGML:
        return _GGML[qtype](data.reshape(-1), n, k)
    if qtype in _BNB:
        return _BNB[qtype](data, stats, n, k, block_size)
    if qtype in _SCALED:
        return _SCALED[qtype](data, stats, n, k, block_size, scale_mode)
    if qtype in _PLAIN:
        return data.reshape(-1).view(_PLAIN[qtype]).float().reshape(n, k)
    return _dense_copy(data, stats, qtype, n, k, block_size, scale_mode)


def _dense_copy(data, stats, qtype, n, k, block_size, scale_mode) -> torch.Tensor:
    """The Rust reference's W for a format with no torch decoder, computed once per weight."""
    hit = _dense.get(id(data))
    if hit is not None and hit[0]() is data and hit[1] == data._version:
        return hit[2]
    from ..tensor import QTensor
    from ..tensor import dequantize as ref_dequantize

    qt = QTensor(
        qtype=qtype,
        shape=(n, k),
        data=data.detach().cpu().numpy().reshape(-1),
        block_size=block_size,
        stats=stats.detach().cpu().numpy().reshape(-1).astype(np.float32, copy=False),
        scale_mode=scale_mode or None,
    )
    w = torch.from_numpy(ref_dequantize(qt)).to(data.device)
    key = id(data)
    _dense[key] = (weakref.ref(data), data._version, w)
    weakref.finalize(data, _dense.pop, key, None)
    return w


def qmatmul(
    x: torch.Tensor, data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int,
    block_size: int, scale_mode: str,
) -> torch.Tensor:  # fmt: skip
    """y = x @ W.T on x's device: W dequantized there, then F.linear in x's dtype."""
    w = dequantize(data, stats, qtype, n, k, block_size, scale_mode)
    lead = x.shape[:-1]
    y = torch.nn.functional.linear(x.reshape(-1, k), w.to(x.dtype))
    return y.reshape(*lead, n)
