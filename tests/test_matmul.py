"""The quantized CPU matmul `_native.qmatmul`: y = x · Wᵀ, W quantized (N x K), x float32 (M x K).

What is compared with what:
- every qtype against the float64 product of the dequantized weights with x, within the bound
  derived below (the kernel quantizes x for the ggml types);
- the ggml types against libggml's own `ggml_vec_dot_*_generic` on activations quantized by
  libggml's `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref` / `quantize_row_q8_K_ref` (same
  integers, other float order: a much tighter bound, which also pins our activation quantization
  to ggml's);
- 1 thread against 2 threads, and the SIMD build against FERROQUANT_FORCE_SCALAR=1: identical bits;
- bad shapes and values: ferroquant.QuantizeError.

Weights: fq.quantize / fq.dequantize for every format (int8 per row and per block of 32, fp8 per
row, tensor and block of 32); and, so the kernels are also checked on bytes ferroquant did not
write, the ggml types quantized by libggml (`peers.ggml_quantize`, dequantized by gguf-py), nf4
by bitsandbytes (quantize_4bit / dequantize_4bit, plain fp32 absmax) and fp8 by torch's casts.

Error bound (q8 activations). The kernel computes Σ_i w_i x̂_i exactly in integers per block, with
x̂ the activation dequantized from its q8 block of scale d = amax/127:
  q8_0: x̂ = f16(d)·q, q = round(x/d), |q| <= 127, so |x - x̂| <= d/2 + 127·|d - f16(d)| =: e_b
        (< 0.57·d while d is a normal f16; for tiny blocks d's f16 rounding dominates and e_b is
        computed exactly);
  q8_K: x̂ = q/iscale with q = nearest_int(iscale·x), so |x - x̂| <= d/2·(1 + 2^-20) < 0.501·d =: e_b.
Hence |Σ w_i x_i - Σ w_i x̂_i| <= Σ_b e_b·Σ_{i in b} |w_i|.
  q8_1 (q4_1, q5_1: w = d_w·q + m per block): x̂ as q8_0, plus s = f16(d·Σq) (d the f32 scale)
        standing for Σ_b x̂ = f16(d)·Σq in the term m·s. The kernel's exact value per block is
        d_w·f16(d)·Σ q_w q + m·s = Σ_b w x̂ + m·(s - f16(d)·Σq), so the block contributes at most
        e_b·Σ|w| + |m|·e_s, e_s = |Σq|·|d - f16(d)| + 2^-11·|d·Σq| + 2^-25 (s's f16 rounding),
        with |Σq| <= Σ_b|x|/d + 16; in the float slack w̃ = |w| + 2|m| (the terms d_w·isum and
        m·s can each exceed |w·x|).
The float part:
each block product takes at most 3 roundings and the sum of nb products in 8 lanes at most
nb/8 + 3 more; the f32 dequantized reference weights carry one rounding each, or for q4_k/q5_k
(w = d·sc·q - dmin·m) up to 3 roundings of terms as large as ~3·max|w| of the sub-block. We allow
  slack = (nb + 32)·2^-23·Σ_i w̃_i·(|x_i| + e_b),  w̃_i = |w_i| (+ 4·max_sub-block|w| for q4_k/q5_k;
  + 2·|dmin·m| of the group of 16 for q2_k, read from the bytes; + 2|m| for q4_1/q5_1).
For fp8 (f32 activations) only the slack remains, with nb replaced by K/8 + nb (fp8 bytes decode
exactly, so the kernel differs from the dequantized product by float rounding only). That is
loose: the kernels fuse every multiply-add into 64 lanes, so a lane's chain has K/64 roundings,
plus one per block for the scale, plus 4 for the fold.
nf4 / int8 (q16 activations, `reference/q16.rs`): x̂ = d·q per block of 64 with d = amax/32767
(f32) and q = round(x/d), so |x - x̂| <= d/2·(1 + 2^-20) =: e (a block with d below 2^-126 counts
as zero: e = amax); nf4's codes are round(code·8191)/8191, within 0.5/8191 of the f32 code, so
its weights are off by at most c = absmax·0.5/8191. Hence |y - Σ w x| <= Σ e|w| + Σ c(|x| + e) +
slack, slack = (K/16 + 32)·2^-23·Σ (|w| + c)(|x| + e): each lane's chain takes one fma a unit
of 32 or 128 (K/64 roundings at most), one rounding each for the integer sum's conversion and
the scale product, and the fold.
bf16 GEMM (nf4 / int8 / fp8 from `_native.qmatmul_bf16_min_m()` rows on, K a multiple of 32, CPUs
with AVX-512 BF16; `reference/bf16.rs`): weights (the f32 dequantized values) and activations
rounded to bf16 (relative u_b = 2^-8, subnormals flushed), exact products, one f32 chain of K
fused adds per output (subnormal results flushed), so |y - Σ w x| <= (2u_b + u_b²)·S +
γ_K·(1 + u_b)²·S + 2^-126·(Σ|x| + Σ|w| + 2K), S = Σ|w x|, γ_K = K·2^-24/(1 - K·2^-24). There the
outputs are also compared bit for bit with `bf16_reference`, a numpy emulation of the same
arithmetic (written from the Intel SDM's `vdpbf16ps`, independent of the Rust reference).
On AMX bf16 tiles (from `_native.qmatmul_bf16_amx_min_m()` rows) the sums run in the tiles'
own order: the same bound with 2^-23 for 2^-24; the ggml formats (not tq*) take those tiles
from `_native.qmatmul_bf16_ggml_min_m(qtype)` rows, their weights gguf-py's dequantized values
rounded to bf16, so they are checked against that bound there instead of the q8 one below.
Against libggml: both sides sum the same integers; each side's float work is at most
nb + 16 roundings (block products, lane / sequential sums; for iq4_xs libggml adds its K/32
sub-block products one by one, so nb = K/32 there), bound 2·(nb + 16)·2^-24·Σ w̃_i |x̂_i|
(|x̂_i| <= |x_i| + e_b). libggml's generic vec_dots are compiled with fused multiply-adds (seen
in the disassembly of libggml-cpu), which only removes roundings from their side.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant import _native

import peers
from data import DISTRIBUTIONS, make

GGML_QTYPES = (
    *("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"),
    *("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"),
    *("tq1_0", "tq2_0"),
)
FP8_KINDS = ("fp8_e4m3_row", "fp8_e4m3_tensor", "fp8_e5m2_row", "fp8_e5m2_block")
QTYPES = (*GGML_QTYPES, "nf4", "int8_row", "int8_block", *FP8_KINDS)
BLOCK = {
    **dict.fromkeys(("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"), 32),
    **dict.fromkeys(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "tq1_0", "tq2_0"), 256),
}
MIN32 = ("q4_1", "q5_1")  # w = d·q + m per block of 32, activations quantized to q8_1
U = 2.0**-24


@dataclass
class Weights:
    qtype: str  # the name qmatmul takes
    n: int
    k: int
    data: np.ndarray  # uint8, flat
    block_size: int
    stats: np.ndarray | None
    scale_mode: str | None
    deq: np.ndarray  # float64 (n, k): the dequantized weights

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return _native.qmatmul(
            x, self.data, self.qtype, self.n, self.k, self.block_size, self.stats, self.scale_mode
        )


KIND = {
    "int8_row": ("int8", {"scale_mode": "row"}),
    "int8_block": ("int8", {"scale_mode": "block", "block_size": 32}),
    "fp8_e4m3_row": ("fp8_e4m3", {"scale_mode": "row"}),
    "fp8_e4m3_tensor": ("fp8_e4m3", {"scale_mode": "tensor"}),
    "fp8_e5m2_row": ("fp8_e5m2", {"scale_mode": "row"}),
    "fp8_e5m2_block": ("fp8_e5m2", {"scale_mode": "block", "block_size": 32}),
}


def torch_fp8_weights(kind: str, w: np.ndarray) -> Weights:
    """fp8 bytes written by torch itself (the format's definition: scale = amax/fmax per row or
    block, 1 where that is 0; q = (x / scale).to(float8)), dequantized by torch."""
    torch = peers.require("torch")
    qtype, kw = KIND[kind]
    dt = torch.float8_e4m3fn if qtype == "fp8_e4m3" else torch.float8_e5m2
    n, k = w.shape
    group = kw.get("block_size", k)
    if kw["scale_mode"] == "tensor":
        group = n * k
    xt = torch.from_numpy(np.ascontiguousarray(w)).reshape(-1, group)
    scale = xt.abs().amax(dim=1, keepdim=True) / torch.finfo(dt).max
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (xt / scale).to(dt)
    deq = (q.to(torch.float32) * scale).reshape(n, k).numpy().astype(np.float64)
    data = q.view(torch.uint8).numpy().reshape(-1)
    stats = scale.numpy().reshape(-1).astype(np.float32)
    return Weights(qtype, n, k, data, group, stats, kw["scale_mode"], deq)


def make_weights(kind: str, w: np.ndarray, peer: bool = False) -> Weights:
    """Weights quantized by fq.quantize and dequantized by fq.dequantize; with `peer`, quantized
    by the format's defining library instead (libggml, bitsandbytes) and dequantized by gguf-py /
    bitsandbytes, so the kernel is also checked on bytes ferroquant did not write."""
    n, k = w.shape
    if peer and kind in GGML_QTYPES:
        data = peers.ggml_quantize(w, kind)
        gq = peers.gguf_quants()
        deq = gq.dequantize(data.reshape(n, -1), peers.gguf_qtype(kind)).astype(np.float64)
        return Weights(kind, n, k, data, BLOCK[kind], None, None, deq)
    if peer and kind in FP8_KINDS:
        return torch_fp8_weights(kind, w)
    if peer and kind == "nf4":
        torch = peers.require("torch")
        bnb_f = peers.require("bitsandbytes.functional")
        packed, state = bnb_f.quantize_4bit(
            torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=False
        )
        deq = bnb_f.dequantize_4bit(packed, state).numpy().astype(np.float64)
        absmax = state.absmax.numpy().astype(np.float32)
        return Weights("nf4", n, k, packed.numpy().reshape(-1), 64, absmax, None, deq)
    qtype, kw = KIND.get(kind, (kind, {}))
    qt = fq.quantize(w, qtype, **kw)
    deq = fq.dequantize(qt).astype(np.float64)
    stats = qt.stats if qt.stats.size else None
    return Weights(qtype, n, k, qt.data.reshape(-1), qt.block_size, stats, qt.scale_mode, deq)


def sub_block_max(absw: np.ndarray, size: int) -> np.ndarray:
    n, k = absw.shape
    return np.repeat(absw.reshape(n, k // size, size).max(axis=-1), size, axis=-1)


def block_mins(W: Weights) -> np.ndarray:
    """q4_1 / q5_1: |m| of each weight's block, read from the bytes (f16 at offset 2), (N, K)."""
    nb = W.k // 32
    blocks = W.data.reshape(W.n, nb, -1)
    m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float64)
    return np.repeat(np.abs(m), 32, axis=-1)


def q2k_offsets(W: Weights) -> np.ndarray:
    """q2_k: |dmin·(scales[g] >> 4)| of each weight's group of 16, from the bytes, (N, K)."""
    blocks = W.data.reshape(W.n, W.k // 256, 84)
    dmin = np.ascontiguousarray(blocks[..., 82:84]).view(np.float16).astype(np.float64)
    off = np.abs(dmin * (blocks[..., :16] >> 4))  # (N, nb, 16)
    return np.repeat(off.reshape(W.n, -1), 16, axis=-1)


def weight_magnitude(W: Weights) -> np.ndarray:
    """w̃ of the module docstring."""
    absw = np.abs(W.deq)
    if W.qtype in ("q4_k", "q5_k"):
        return absw + 4 * sub_block_max(absw, 32)
    if W.qtype in MIN32:
        return absw + 2 * block_mins(W)
    if W.qtype == "q2_k":
        return absw + 2 * q2k_offsets(W)
    return absw


def act_scales(x: np.ndarray, block: int) -> np.ndarray:
    """d = amax/127 (f32) per activation block, repeated over the block's columns: (M, K)."""
    m, k = x.shape
    amax = np.abs(x).reshape(m, k // block, block).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32).astype(np.float64)
    return np.repeat(d, block, axis=-1)


def act_error(x: np.ndarray, block: int) -> np.ndarray:
    """Per-element bound on |x - x̂| (module docstring): q8_0 stores d as f16, whose rounding
    error is relative 2^-11 for normal halves but absolute (up to all of d) when d is below the
    f16 normal range, so it is computed exactly here."""
    d = act_scales(x, block)
    if block == 32:
        dh = d.astype(np.float16).astype(np.float64)
        return d / 2 * (1 + 2.0**-20) + 127 * np.abs(d - dh) + 2.0**-20 * d
    return 0.501 * d


def min_term_error(x: np.ndarray) -> np.ndarray:
    """q8_1: e_s per block (module docstring), repeated over the block's columns: (M, K)."""
    m, k = x.shape
    d = act_scales(x, 32)[:, ::32]
    dh = d.astype(np.float16).astype(np.float64)
    sx = np.abs(x.astype(np.float64)).reshape(m, k // 32, 32).sum(axis=-1)
    sum_q = np.divide(sx, d, out=np.zeros_like(d), where=d > 0) + 16
    es = sum_q * np.abs(d - dh) + 2.0**-11 * (sx + 16 * d) + 2.0**-25
    return np.repeat(es, 32, axis=-1)


BF16_QTYPES = ("nf4", "int8", "fp8_e4m3", "fp8_e5m2")


def bf16_path(W: Weights, m: int) -> bool:
    """The call takes the bf16 GEMM (module docstring) on this CPU: the ggml formats from
    `qmatmul_bf16_ggml_min_m` rows (AMX bf16 tiles only), the bf16 family from
    `qmatmul_bf16_min_m`."""
    if W.qtype in GGML_QTYPES:
        g = _native.qmatmul_bf16_ggml_min_m(W.qtype, W.k)
        return bool(g) and m >= g
    t = _native.qmatmul_bf16_min_m()
    return bool(t) and m >= t and W.k % 32 == 0 and W.qtype in BF16_QTYPES


def amx_path(W: Weights, m: int) -> bool:
    """The bf16 GEMM runs on AMX tiles (`x86/amx_bf16.rs`): the same roundings, the tiles' own
    summation order, so within `bf16_bound(..., amx=True)` instead of `bf16_reference`'s bits."""
    if W.qtype in GGML_QTYPES:  # (only ever on the tiles)
        return bf16_path(W, m)
    t = _native.qmatmul_bf16_amx_min_m()
    return bf16_path(W, m) and bool(t) and m >= t


def check_bf16(W: Weights, x: np.ndarray, y: np.ndarray) -> None:
    """y is the bf16 GEMM's: `bf16_reference`'s bits, or on AMX tiles within their bound."""
    if amx_path(W, x.shape[0]):
        exact = x.astype(np.float64) @ W.deq.T
        assert np.all(np.abs(y - exact) <= bf16_bound(W, x, amx=True))
    else:
        assert np.array_equal(y.view(np.uint32), bf16_reference(W, x).view(np.uint32))


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded as `vcvtne2ps2bf16` does: subnormals to signed zero, then round to
    nearest even on the top 16 bits (returned as float32 values)."""
    b = np.ascontiguousarray(a, np.float32).view(np.uint32)
    b = np.where((b & 0x7F800000) == 0, b & 0x80000000, b).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def flush(a: np.ndarray) -> np.ndarray:
    """float32 subnormals to signed zero."""
    b = a.view(np.uint32)
    return np.where((b & 0x7F800000) == 0, b & 0x80000000, b).astype(np.uint32).view(np.float32)


def bf16_reference(W: Weights, x: np.ndarray) -> np.ndarray:
    """The bf16 GEMM's outputs (M, N): per pair of columns, the odd column's product added first,
    each add one fused rounding (the exact product plus the f32 sum, rounded once: exact in
    float64 where it matters, see below) with subnormal results flushed. float64 holds the sum
    of an f32 and a product of two bf16 exactly unless their exponents are over 29 apart, and
    then the smaller one is under a quarter of an f32 ulp of the larger, so the one rounding to
    f32 is the fused one."""
    w = to_bf16(W.deq.astype(np.float32)).astype(np.float64)
    xb = to_bf16(x).astype(np.float64)
    acc = np.zeros((x.shape[0], W.n), np.float32)
    for i in range(0, W.k, 2):
        for e in (i + 1, i):
            acc = flush((acc + np.outer(xb[:, e], w[:, e])).astype(np.float32))
    return acc


def bf16_bound(W: Weights, x: np.ndarray, amx: bool = False) -> np.ndarray:
    """The bf16 GEMM's bound against the float64 product (module docstring), (M, N); `amx`: the
    tiles' (any summation order, each of the K additions rounded faithfully: u = 2^-23)."""
    k = x.shape[1]
    ub, u = 2.0**-8, (2.0**-23 if amx else 2.0**-24)
    ax, aw = np.abs(x.astype(np.float64)), np.abs(W.deq)
    s = ax @ aw.T
    gamma = k * u / (1 - k * u)
    mass = ax.sum(axis=1)[:, None] + aw.sum(axis=1)[None, :] + 2 * k
    return (2 * ub + ub * ub) * s + gamma * (1 + ub) ** 2 * s + 2.0**-126 * mass


def error_bound(W: Weights, x: np.ndarray) -> np.ndarray:
    """The bound derived in the module docstring, per output element (M, N)."""
    m, k = x.shape
    if bf16_path(W, m):
        return bf16_bound(W, x, amx=amx_path(W, m))
    wt = weight_magnitude(W)
    ax = np.abs(x.astype(np.float64))
    if W.qtype in BLOCK:
        block = BLOCK[W.qtype]
        e = act_error(x, block)
        nb = k // block
        # Σ_b e_b Σ_{i in b} |w_i| = e @ |w|ᵀ since e is constant over each block
        act = e @ np.abs(W.deq).T
        if W.qtype in MIN32:
            act = act + min_term_error(x) @ block_mins(W).T / 32
        slack = (nb + 32) * 2.0**-23 * ((ax + e) @ wt.T)
        return act + slack
    if W.qtype in ("nf4", "int8"):
        e = q16_act_error(x)
        cerr = nf4_code_error(W) if W.qtype == "nf4" else np.zeros_like(wt)
        act = e @ np.abs(W.deq).T + (ax + e) @ cerr.T
        return act + (k // 16 + 32) * 2.0**-23 * ((ax + e) @ (wt + cerr).T)
    nb = k // (W.block_size if W.scale_mode != "row" else k)
    return (k // 8 + nb + 32) * 2.0**-23 * (ax @ wt.T)


def q16_act_error(x: np.ndarray) -> np.ndarray:
    """nf4 / int8: |x - x̂| per element (M, K) for q16 activations (module docstring)."""
    m, k = x.shape
    kp = -(-k // 64) * 64
    ax = np.zeros((m, kp))
    ax[:, :k] = np.abs(x.astype(np.float64))
    amax = ax.reshape(m, kp // 64, 64).max(axis=-1)
    d = amax / 32767
    # a block with d below f32's smallest normal counts as zero: its error is its amax
    e = np.where(d >= 2.0**-126, d / 2 * (1 + 2.0**-20), amax)
    return np.repeat(e, 64, axis=-1)[:, :k]


def nf4_code_error(W: Weights) -> np.ndarray:
    """nf4's codes as round(code·8191): within 0.5/8191 of absmax per weight (N, K)."""
    absmax = np.asarray(W.stats, np.float64).reshape(W.n, -1)
    return np.repeat(absmax, W.block_size, axis=-1) * (0.5 / 8191)


def check_against_dequantized(W: Weights, x: np.ndarray) -> np.ndarray:
    y = W.matmul(x)
    assert y.shape == (x.shape[0], W.n) and y.dtype == np.float32
    exact = x.astype(np.float64) @ W.deq.T
    bound = error_bound(W, x)
    err = np.abs(y - exact)
    bad = np.argwhere(err > bound)
    assert bad.size == 0, (
        f"{W.qtype}: {len(bad)} outputs off; first {tuple(bad[0])}: got {y[tuple(bad[0])]}, "
        f"float64 {exact[tuple(bad[0])]}, bound {bound[tuple(bad[0])]}"
    )
    return y


# ----------------------------------------------------------------------------- libggml vec_dot


@lru_cache(maxsize=1)
def _libggml_cpu() -> ctypes.CDLL:
    llama_cpp = peers.require("llama_cpp")
    base = peers.libggml()  # loads libggml-base first
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(sorted(libdir.glob("libggml-cpu.*"))[0]))
    lib.ggml_cpu_init()  # fills the f16 -> f32 table the vec_dot functions read
    for name in ("quantize_row_q8_0_ref", "quantize_row_q8_1_ref", "quantize_row_q8_K_ref"):
        getattr(base, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


VEC_DOT = {
    "q4_0": ("ggml_vec_dot_q4_0_q8_0_generic", "q8_0"),
    "q4_1": ("ggml_vec_dot_q4_1_q8_1_generic", "q8_1"),
    "q5_1": ("ggml_vec_dot_q5_1_q8_1_generic", "q8_1"),
    "q5_0": ("ggml_vec_dot_q5_0_q8_0_generic", "q8_0"),
    "q8_0": ("ggml_vec_dot_q8_0_q8_0_generic", "q8_0"),
    "iq4_nl": ("ggml_vec_dot_iq4_nl_q8_0_generic", "q8_0"),
    "q4_k": ("ggml_vec_dot_q4_K_q8_K_generic", "q8_K"),
    "q5_k": ("ggml_vec_dot_q5_K_q8_K_generic", "q8_K"),
    "q6_k": ("ggml_vec_dot_q6_K_q8_K_generic", "q8_K"),
    "q2_k": ("ggml_vec_dot_q2_K_q8_K_generic", "q8_K"),
    "q3_k": ("ggml_vec_dot_q3_K_q8_K_generic", "q8_K"),
    "iq4_xs": ("ggml_vec_dot_iq4_xs_q8_K_generic", "q8_K"),
    "tq1_0": ("ggml_vec_dot_tq1_0_q8_K_generic", "q8_K"),
    "tq2_0": ("ggml_vec_dot_tq2_0_q8_K_generic", "q8_K"),
}


def ggml_matmul(W: Weights, x: np.ndarray) -> np.ndarray:
    """libggml's reference dot products, one output at a time."""
    lib = _libggml_cpu()
    base = peers.libggml()
    fname, act = VEC_DOT[W.qtype]
    fn = getattr(lib, fname)
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]  # fmt: skip
    m, k = x.shape
    act_bytes = {"q8_0": k // 32 * 34, "q8_1": k // 32 * 36, "q8_K": k // 256 * 292}[act]
    quant = getattr(base, f"quantize_row_{act}_ref")
    row_bytes = W.data.size // W.n
    y = np.zeros((m, W.n), np.float32)
    s = np.zeros(1, np.float32)
    for mi in range(m):
        xr = np.ascontiguousarray(x[mi], dtype=np.float32)
        xq = np.zeros(act_bytes, np.uint8)
        quant(xr.ctypes.data, xq.ctypes.data, k)
        for r in range(W.n):
            wrow = W.data[r * row_bytes : (r + 1) * row_bytes]
            fn(k, s.ctypes.data, 0, wrow.ctypes.data, 0, xq.ctypes.data, 0, 1)
            y[mi, r] = s[0]
    return y


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", QTYPES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_against_float64_of_dequantized(kind, dist):
    k = 512
    w = make(dist, 37, k, seed=hash((kind, dist)) % 1000)
    x = make(dist, 9, k, seed=1 + hash((dist, kind)) % 1000)
    check_against_dequantized(make_weights(kind, w), x)


@pytest.mark.parametrize("kind", GGML_QTYPES)
@pytest.mark.parametrize("dist", ("normal", "outliers", "zero_and_constant_blocks", "huge"))
def test_against_libggml_vec_dot(kind, dist):
    k = 768
    w = make(dist, 19, k, seed=7)
    x = make(dist, 3, k, seed=8)
    W = make_weights(kind, w, peer=True)
    y = W.matmul(x)
    ref = ggml_matmul(W, x)
    # libggml's iq4_xs sums its 8 sub-blocks of 32 in floats: K/32 sequential adds
    nb = k // (32 if kind == "iq4_xs" else BLOCK[kind])
    xhat = np.abs(x.astype(np.float64)) + act_error(x, BLOCK[kind])
    bound = 2 * (nb + 16) * U * (xhat @ weight_magnitude(W).T)
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(err.argmax(), err.shape)
    assert (err <= bound).all(), f"max err {err.max()} at {worst}, bound there {bound[worst]}"


def unpack_min32(W: Weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q4_1 / q5_1 bytes -> (d, m) float32 per block and the unsigned quants (N, K) int64."""
    blocks = W.data.reshape(W.n, W.k // 32, -1)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., -16:].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1)
    if W.qtype == "q5_1":
        qh = np.ascontiguousarray(blocks[..., 4:8]).view(np.uint32).astype(np.int64)
        q |= ((qh >> np.arange(32)) & 1) << 4
    return d, m, q.reshape(W.n, W.k)


@pytest.mark.parametrize("kind", MIN32)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_min32_one_block_exact_on_libggml_q8_1(kind, dist):
    """K = 32 (one block, no lane sums): our output must be f32(f32(d_w·d_x)·isum) + f32(m·s)
    exactly, computed here in numpy float32 from libggml's own q8_1 activations
    (`quantize_row_q8_1_ref`) and libggml-quantized weights: pins our q8_1 quantization (d, s,
    quants) and the block formula to ggml's. (libggml's generic vec_dot is compiled with a fused
    multiply-add, fma(d_w·d_x, isum, m·s) (seen in its disassembly), so it is compared within the
    bound in test_against_libggml_vec_dot instead.)"""
    n = 7
    W = make_weights(kind, make(dist, n, 32, seed=21), peer=True)
    x = make(dist, 5, 32, seed=22)
    y = W.matmul(x)
    _libggml_cpu()
    base = peers.libggml()
    dw, mw, qw = unpack_min32(W)
    for mi in range(x.shape[0]):
        xq = np.zeros(36, np.uint8)
        xr = np.ascontiguousarray(x[mi])
        base.quantize_row_q8_1_ref(xr.ctypes.data, xq.ctypes.data, 32)
        dx, sx = xq[0:4].view(np.float16).astype(np.float32)
        isum = (qw @ xq[4:].view(np.int8).astype(np.int64)).astype(np.float32)
        want = (dw[:, 0] * dx) * isum + mw[:, 0] * sx
        assert np.array_equal(y[mi], want), (kind, dist, mi, y[mi], want)


@pytest.mark.parametrize("kind", (*GGML_QTYPES, "nf4", *FP8_KINDS))
@pytest.mark.parametrize("dist", ("normal", "outliers", "tiny"))
def test_peer_quantized_weights(kind, dist):
    """Bytes written by libggml / bitsandbytes / torch (fp8 casts), reference weights dequantized
    by gguf-py / bitsandbytes / torch."""
    w = make(dist, 21, 512, seed=11)
    x = make(dist, 5, 512, seed=12)
    check_against_dequantized(make_weights(kind, w, peer=True), x)


def test_float64_bound_is_not_vacuous():
    """The derived bound is below the size of the outputs, so a gross kernel error (a block of
    weights lost) would exceed it. It is a worst case (every activation error aligned with the
    weight's sign), loosest for q8_K's 256-wide activation blocks; the libggml comparison above
    is the tight check."""
    w = make("normal", 64, 1024, seed=3)
    x = make("normal", 4, 1024, seed=4)
    for kind in QTYPES:
        W = make_weights(kind, w)
        y = x.astype(np.float64) @ W.deq.T
        bound = error_bound(W, x)
        assert np.median(bound) < 0.6 * np.median(np.abs(y)), kind
        lost = x.astype(np.float64) @ np.where(np.arange(1024) < 512, 0, W.deq).T
        assert (np.abs(lost - y) > bound).mean() > 0.5, kind


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(QTYPES),
    dist=st.sampled_from(DISTRIBUTIONS),
    nb=st.integers(1, 9),
    n=st.integers(0, 16).map(lambda i: 2 * i + 1),
    m=st.one_of(st.integers(1, 17), st.just(64)),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_threads(kind, dist, nb, n, m, seed):
    block = BLOCK.get(kind, 64)
    k = nb * block
    if kind == "nf4" and k % 64:
        k = 64 * nb
    w = make(dist, n, k, seed=seed)
    x = make(dist, m, k, seed=seed + 1)
    W = make_weights(kind, w)
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        y1 = check_against_dequantized(W, x)
        fq.set_num_threads(2)
        y2 = W.matmul(x)
    finally:
        fq.set_num_threads(before)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))
    if bf16_path(W, m):
        # the bf16 GEMM: every output is the emulated chain's, bit for bit (AMX: its bound)
        check_bf16(W, x, y1)
        return
    # every row of a batch equals the same row computed alone (one sequence per output)
    i = seed % m
    assert np.array_equal(W.matmul(x[i : i + 1]).view(np.uint32), y1[i : i + 1].view(np.uint32))


def tiled_case(kind: str) -> tuple[int, int, int]:
    """(N, K, M) big enough for the pool to split the work (M·N·K above the serial threshold)
    with N not a multiple of the 8-row tile panel, K with a partial group of 8 blocks for the
    32-weight formats, and M = 67 split into two uneven blocks of activation rows."""
    block = BLOCK.get(kind, 64)
    return 131, (1312 if block == 32 else 1280), 67


@pytest.mark.parametrize("kind", QTYPES)
def test_tiled_batches_threads_and_rows(kind):
    """The tiled M >= 2 path, split over tasks and blocks of rows: 1 thread == 2 threads bit for
    bit, every row equals the same row computed alone, and the result is within the float64
    bound."""
    n, k, m = tiled_case(kind)
    W = make_weights(kind, make("normal", n, k, seed=3))
    x = make("outliers", m, k, seed=4)
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        y1 = check_against_dequantized(W, x)
        fq.set_num_threads(2)
        y2 = W.matmul(x)
        y3 = W.matmul(x[:3])
    finally:
        fq.set_num_threads(before)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))
    if bf16_path(W, m):
        # the bf16 GEMM (rows below its threshold take the other numerics)
        check_bf16(W, x, y1)
        return
    assert np.array_equal(y1[:3].view(np.uint32), y3.view(np.uint32))
    for i in (0, 5, 33, 34, 66):
        assert np.array_equal(W.matmul(x[i : i + 1])[0].view(np.uint32), y1[i].view(np.uint32)), i


@pytest.mark.parametrize("kind", [q for q in GGML_QTYPES if not q.startswith("tq")])
def test_ggml_formats_on_bf16_tiles_from_their_threshold(kind):
    """From `qmatmul_bf16_ggml_min_m(kind, k)` rows (only where AMX bf16 runs) a ggml format takes
    the bf16 tiles: within their bound of the float64 product of gguf-py's dequantized weights,
    the same bits on 1 and 2 threads; one row below, its int8 paths (every row equals the same
    row computed alone). Elsewhere (no AMX) the int8 paths at every M."""
    n, k = 37, 512
    t = _native.qmatmul_bf16_ggml_min_m(kind, k)
    W = make_weights(kind, make("normal", n, k, seed=5))
    before = fq.num_threads()
    for m in [t - 1, t, 130] if t else [100]:
        x = make("outliers", m, k, seed=m)
        try:
            fq.set_num_threads(1)
            y1 = check_against_dequantized(W, x)
            fq.set_num_threads(2)
            y2 = W.matmul(x)
        finally:
            fq.set_num_threads(before)
        assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))
        assert bf16_path(W, m) == (t > 0 and m >= t)
        if bf16_path(W, m):
            check_bf16(W, x, y1)
            continue
        for i in (0, m // 2, m - 1):
            assert np.array_equal(W.matmul(x[i : i + 1])[0].view(np.uint32), y1[i].view(np.uint32))


def test_ggml_bf16_route_on_by_default_and_its_opt_out(monkeypatch):
    """Where AMX bf16 runs the ggml formats take the tiles by default (unset, "1": 48 rows,
    the K-quants by matmul/k_route.rs: 48, q6_k 64);
    n >= 2: from n rows, at least the tiles' own minimum);
    FERROQUANT_GGML_BF16=0 keeps their int8 paths at every M. Without AMX bf16: never."""
    amx = _native.qmatmul_bf16_amx_min_m()
    # (the ggml formats' least is the small-M tiles' 8 rows, `qmatmul_bf16_amx_min_m`:
    # session 18 let FERROQUANT_GGML_BF16 reach them)
    least = amx
    for raw, q4, q8 in [(None, 48, 48), ("1", 48, 48), ("0", 0, 0), ("40", 40, 40),
                        ("2", least, least)]:  # fmt: skip
        if raw is None:
            monkeypatch.delenv("FERROQUANT_GGML_BF16", raising=False)
        else:
            monkeypatch.setenv("FERROQUANT_GGML_BF16", raw)
        got = (
            _native.qmatmul_bf16_ggml_min_m("q4_k", 4096),
            _native.qmatmul_bf16_ggml_min_m("q8_0", 4096),
        )
        assert got == ((q4, q8) if amx else (0, 0)), raw
        if amx and raw in (None, "1"):
            for k in (4096, 14336):
                assert _native.qmatmul_bf16_ggml_min_m("q5_1", k) == 48
                assert _native.qmatmul_bf16_ggml_min_m("q3_k", k) == 48
                assert _native.qmatmul_bf16_ggml_min_m("q6_k", k) == 64
        assert _native.qmatmul_bf16_ggml_min_m("tq2_0", 4096) == 0


SCALAR_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import test_matmul as t
from ferroquant import _native
from data import make
out = {}
for kind in t.QTYPES:
    for i, (n, k, m) in enumerate([(13, 512, 1), (9, 2304, 5), (33, 256, 64), t.tiled_case(kind)]):
        W = t.make_weights(kind, make("normal", n, k, seed=i))
        out[f"{kind}/{i}"] = W.matmul(make("heavy_tailed", m, k, seed=10 + i))
np.savez(sys.argv[2], **out)
"""


def test_simd_matches_forced_scalar_bitwise(tmp_path):
    from data import make as mk

    path = tmp_path / "scalar.npz"
    tests_dir = os.path.dirname(__file__)
    env = dict(os.environ, FERROQUANT_FORCE_SCALAR="1")
    r = subprocess.run(
        [sys.executable, "-c", SCALAR_SCRIPT, tests_dir, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    scalar = np.load(path)
    assert _native.simd_level() in ("avx2", "neon", "neon+dotprod", "scalar")
    for kind in QTYPES:
        cases = [(13, 512, 1), (9, 2304, 5), (33, 256, 64), tiled_case(kind)]
        for i, (n, k, m) in enumerate(cases):
            W = make_weights(kind, mk("normal", n, k, seed=i))
            x = mk("heavy_tailed", m, k, seed=10 + i)
            y = W.matmul(x)
            # forced scalar has no bf16 path: where SIMD takes it, both are checked against
            # their own references (the scalar run ran the q16 / f32 one, as at m < threshold)
            if bf16_path(W, m):
                check_bf16(W, x, y)
                continue
            want = scalar[f"{kind}/{i}"]
            assert np.array_equal(y.view(np.uint32), want.view(np.uint32)), (
                kind,
                i,
            )


def test_zero_activations_and_zero_weights():
    w = make("normal", 5, 256, seed=0)
    for kind in QTYPES:
        W = make_weights(kind, w)
        assert not W.matmul(np.zeros((3, 256), np.float32)).any(), kind
        Z = make_weights(kind, np.zeros((5, 256), np.float32))
        assert not Z.matmul(make("normal", 2, 256, seed=1)).any(), kind


def test_sign_and_scale_behaviour():
    """y(-x) = -y(x) exactly; y(2^j x) = 2^j y(x) exactly (power-of-two activation scaling moves
    only the activation scales' exponents, in every format)."""
    w = make("normal", 11, 512, seed=5)
    x = make("normal", 3, 512, seed=6)
    for kind in QTYPES:
        W = make_weights(kind, w)
        y = W.matmul(x)
        assert np.array_equal(W.matmul(-x), -y), kind
        assert np.array_equal(W.matmul(x * np.float32(4.0)), y * np.float32(4.0)), kind


def bad_call(**over):
    W = make_weights("q4_0", make("normal", 4, 64, seed=0))
    args = dict(
        x=make("normal", 2, 64, seed=1),
        data=W.data,
        qtype="q4_0",
        n=4,
        k=64,
        block_size=32,
        stats=None,
        scale_mode=None,
    )
    args.update(over)
    return _native.qmatmul(**args)


@pytest.mark.parametrize(
    "over",
    [
        {"k": 32},
        {"n": 5},
        {"x": np.zeros((2, 96), np.float32)},
        {"x": np.full((1, 64), np.nan, np.float32)},
        {"x": np.full((1, 64), np.inf, np.float32)},
        {"x": np.zeros((64, 4), np.float32).T},
        {"data": np.zeros(10, np.uint8)},
        {"block_size": 64},
        {"block_size": 0},
        {"qtype": "fp4"},
        {"qtype": "q9_9"},
        {"qtype": "nf4", "block_size": 64, "data": np.zeros(128, np.uint8),
         "stats": np.ones(3, np.float32)},
        {"qtype": "nf4", "block_size": 48, "data": np.zeros(128, np.uint8),
         "stats": np.ones(4, np.float32)},
        {"qtype": "int8", "data": np.zeros(256, np.uint8), "scale_mode": None},
        {"qtype": "fp8_e4m3", "data": np.zeros(256, np.uint8), "scale_mode": None},
        {"qtype": "fp8_e5m2", "data": np.zeros(256, np.uint8), "scale_mode": "row",
         "stats": np.ones(3, np.float32)},
        {"qtype": "int8", "data": np.zeros(256, np.uint8), "scale_mode": "row",
         "stats": np.ones(3, np.float32)},
        {"qtype": "int8", "data": np.zeros(256, np.uint8), "scale_mode": "sideways",
         "stats": np.ones(4, np.float32)},
    ],
)  # fmt: skip
def test_bad_inputs_raise_quantize_error(over):
    with pytest.raises(fq.QuantizeError):
        bad_call(**over)


def test_empty_batch_gives_empty_result():
    y = bad_call(x=np.zeros((0, 64), np.float32))
    assert y.shape == (0, 4) and y.dtype == np.float32
    with pytest.raises(fq.QuantizeError):  # the weights are still checked
        bad_call(x=np.zeros((0, 64), np.float32), data=np.zeros(10, np.uint8))


def test_qmatmul_qtypes_lists_the_kernels():
    from ferroquant.qtypes import gint_params, is_float_zero

    gints = [q.name for q in fq.qtypes() if gint_params(q.name) is not None]
    assert len(gints) == 28
    gints += [q.name for q in fq.qtypes() if is_float_zero(q.name)]  # int*_g*_fz
    assert sorted(_native.qmatmul_qtypes()) == sorted(
        [*GGML_QTYPES, "nf4", "int8", "fp8_e4m3", "fp8_e5m2", *gints]
    )


def test_good_call_of_bad_call_helper_works():
    """The helper above is valid without overrides, so each failure is due to its override."""
    y = bad_call()
    assert y.shape == (2, 4)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1), max_size=700),
    st.sampled_from((1, 2, 4, 8)),
    st.sampled_from((0, 256, 4096)),
    st.booleans(),
)
def test_stream_read_probes_sum_every_word_once(words, streams, ahead, vector):
    """The benchmarks' bandwidth probe (bench_matmul.py's PROBES): every probe returns the
    wrapping sum of the buffer's 8-byte words, on the pool and on one thread."""
    a = np.array(words, dtype=np.uint64)
    want = sum(words) % 2**64
    for threads in (0, 1):
        fq.set_num_threads(threads)
        try:
            got = _native.stream_read(a.view(np.uint8), streams=streams, ahead=ahead, vector=vector)
        finally:
            fq.set_num_threads(0)
        assert got == want


def test_stream_read_rejects_a_bad_stream_count():
    with pytest.raises(fq.QuantizeError, match="streams must be 1, 2, 4 or 8, not 3"):
        _native.stream_read(np.zeros(64, dtype=np.uint8), streams=3)
