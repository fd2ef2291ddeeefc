"""Fake quantization in torch: `dequantize(quantize(w))` of every ferroquant weight format, bit for
bit what the Rust reference stores (tests/test_qat.py checks every format against
`ferroquant.dequantize(ferroquant.quantize(w, qtype))`), and the activation rounding of the CPU
kernels (rust/core/src/matmul/reference.rs and reference/q16.rs).

Each weight function returns `(values, keep)`: the dequantized weights (float32, the shape of
`w`) and the straight-through estimator's mask, False where the format clipped the weight (its
rounded level hit the end of the grid from beyond it), so no gradient flows through a weight the
format cannot follow. Scales come from the weights passed in, by the format's own rule, so a
training step always sees the scales of the current weights.

Written in torch: q4_0 q4_1 q5_0 q5_1 q8_0 (ggml's `quantize_row_*_ref`), nf4 / fp4
(bitsandbytes' bucket search), int8 / fp8 (torch's own expression, see rust/core/src/formats),
f16 / bf16 / f32 (casts) and BitNet b1.58's absmean ternary quantizer. The K-quants (q2_k..q6_k)
and iq4_nl / iq4_xs choose their scales by an iterative search (ggml's `make_qx_quants`,
`make_qkx2_quants`, `quantize_row_iq4_nl_impl`); for them the values come from the Rust
quantizer itself (`ferroquant.quantize` then `dequantize`, identical by construction) and the
mask is all True.
"""

from __future__ import annotations

import numpy as np
import torch

from ..qtypes import qtype_info
from ..tensor import QuantizeError, dequantize, quantize

# Formats whose fake quantization is written in torch here; the rest go through Rust.
TORCH_QTYPES = frozenset(
    "f32 f16 bf16 q4_0 q4_1 q5_0 q5_1 q8_0 nf4 fp4 int8 fp8_e4m3 fp8_e5m2".split()
)
TERNARY = "ternary"
# BitNet b1.58 (Ma et al. 2024): W / (mean|W| + eps), rounded and clipped to {-1, 0, 1}.
TERNARY_EPS = 1e-5

_NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
            -2.0, -3.0]  # fmt: skip
_FP4_ORDER = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]


def _c_to_i8(v: torch.Tensor) -> torch.Tensor:
    """C's `(int8_t)(int32_t)v` as ggml's reference quantizers use it (rust `c_to_i8`): truncate
    toward zero, 0 for NaN or out of the int32 range, then wrap to int8."""
    ok = torch.isfinite(v) & (v >= -2147483648.0) & (v < 2147483648.0)
    i = torch.where(ok, torch.trunc(v), torch.zeros_like(v)).to(torch.int64)
    return ((i + 128) % 256) - 128


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), 0.0)


def _f16(d: torch.Tensor) -> torch.Tensor:
    """A scale as the block stores it (f16, round to nearest even) and reads it back."""
    return d.to(torch.float16).to(torch.float32)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exact for every float32 (no `floor(v + 0.5)` rounding)."""
    t = torch.trunc(v)
    f = v - t  # exact
    return t + (f >= 0.5).to(v.dtype) - (f <= -0.5).to(v.dtype)


def _blocks(w: torch.Tensor, n: int) -> torch.Tensor:
    return w.reshape(-1, n)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """ggml's `max`: the first value of largest magnitude in each block (0 for an all-zero one)."""
    a = x.abs()
    amax = a.amax(dim=1, keepdim=True)
    first = (a == amax).to(torch.int8).argmax(dim=1, keepdim=True)
    m = torch.gather(x, 1, first)
    return torch.where(amax > 0, m, torch.zeros_like(m))


def _legacy_sym(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_0 (levels 16) / q5_0 (32): d = max / -(levels / 2),
    q = min(levels - 1, (int8)(x / d + levels / 2 + 0.5))."""
    half = levels // 2
    d = _signed_absmax(x) / -float(half)
    v = x * _inverse(d) + (half + 0.5)
    q = torch.clamp(_c_to_i8(v), max=levels - 1)
    keep = v < levels  # the level `levels - 1` reached from beyond the grid clips
    return (q - half).to(torch.float32) * _f16(d), keep


def _legacy_min_parts(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_1 (16) / q5_1 (32) blocks as (q * d, m): d = (max - min) / (levels - 1),
    q = (int8)((x - min) / d + 0.5), m = min, d and m stored as f16."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / float(levels - 1)
    v = (x - lo) * _inverse(d) + 0.5
    q = _c_to_i8(v)
    if levels == 16:
        q = torch.clamp(q, max=15)
    else:
        q = q & 31  # q5_1 keeps 5 bits without a clamp (never more than 31 for finite input)
    return q.to(torch.float32) * _f16(d), _f16(lo)


def _legacy_min(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    qd, m = _legacy_min_parts(x, levels)
    return qd + m, torch.ones_like(x, dtype=torch.bool)


def min_format_parts(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_1 / q5_1 weights [n, k] apart: (q * d [n, k], the block minimums m [n, k / 32]); the
    kernel multiplies them separately (the m term against the activations' q8_1 sums)."""
    x = w.detach().to(torch.float32)
    qd, m = _legacy_min_parts(_blocks(x, 32), 16 if qtype == "q4_1" else 32)
    return qd.reshape(x.shape), m.reshape(x.shape[0], -1)


def q8_1_sums(x: torch.Tensor) -> torch.Tensor:
    """The q8_1 activation blocks' `s = f16(d * Σq)` [m, k / 32] (reference/q8_1.rs)."""
    xb = x.detach().to(torch.float32).reshape(-1, 32)
    d = xb.abs().amax(dim=1, keepdim=True) / 127.0
    q = _c_to_i8(_round_half_away(xb * _inverse(d)))
    s = q.sum(dim=1, keepdim=True).to(torch.float32) * d
    return _f16(s).reshape(x.shape[0], -1)


def _q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    q = _c_to_i8(_round_half_away(x * _inverse(d)))
    return q.to(torch.float32) * _f16(d), torch.ones_like(x, dtype=torch.bool)


def _bnb4(
    x: torch.Tensor, qtype: str, kernel_codes: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    if qtype == "fp4":
        code = torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0
        order = torch.tensor(_FP4_ORDER)
    else:
        code = torch.tensor(_NF4_CODE, dtype=torch.float32)
        order = torch.arange(16)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2.0
    absmax = x.abs().amax(dim=1, keepdim=True)
    v = x * (1.0 / absmax.clamp(min=1e-38))
    bucket = torch.bucketize(v, bounds)  # the number of bounds below v
    if kernel_codes:  # the CPU kernel's nf4 codes: round(code * 8191) / 8191 (reference/q16.rs)
        code = torch.round(code * 8191.0) / 8191.0
    return code[order[bucket]] * absmax, torch.ones_like(x, dtype=torch.bool)


def nf4_kernel_weights(w: torch.Tensor) -> torch.Tensor:
    """nf4 weights as the CPU kernel multiplies them: its 16-bit codes `round(code * 8191)`
    (within 6.1e-5 of the code) times absmax; the stored format's values are
    `fake_quantize_weight`'s."""
    x = w.detach().to(torch.float32)
    return _bnb4(_blocks(x, qtype_info("nf4").block_size), "nf4", True)[0].reshape(x.shape)


def _scaled(x: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 / fp8 with one scale per row (ferroquant's default scale mode)."""
    amax = x.abs().amax(dim=1, keepdim=True)
    if qtype == "int8":
        scale = amax / 127.0
        safe = torch.where(scale == 0, 1.0, scale)
        q = torch.round(x / safe).clamp(-127, 127) + 0.0  # + 0.0: -0 -> 0, as the byte 0 reads
        return q * scale, torch.ones_like(x, dtype=torch.bool)
    dt = torch.float8_e4m3fn if qtype == "fp8_e4m3" else torch.float8_e5m2
    fmax = torch.finfo(dt).max
    scale = amax / fmax
    scale = torch.where(scale == 0, 1.0, scale)
    q = (x / scale).to(dt).to(torch.float32)
    return q * scale, torch.ones_like(x, dtype=torch.bool)


def ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's absmean quantizer: gamma = mean|W| over the tensor, W' = gamma *
    clip(round(W / (gamma + eps)), -1, 1); the mask drops the weights clipped to +-1."""
    x = w.detach().to(torch.float32)
    gamma = x.abs().mean()
    v = x / (gamma + TERNARY_EPS)
    return torch.round(v).clamp(-1, 1) * gamma, v.abs() <= 1.5


def _rust(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.detach().to("cpu", torch.float32).contiguous()
    values = torch.from_numpy(np.ascontiguousarray(dequantize(quantize(x, qtype))))
    return values.to(w.device), torch.ones_like(w, dtype=torch.bool)


def check_row_length(qtype: str, cols: int, name: str = "weight") -> None:
    """A clear error when rows of `cols` weights do not hold whole blocks of `qtype`."""
    if qtype == TERNARY or qtype in ("f32", "f16", "bf16", "int8", "fp8_e4m3", "fp8_e5m2"):
        return
    bs = qtype_info(qtype).block_size
    if cols % bs:
        raise QuantizeError(
            f"{name}: row length {cols} is not a multiple of {qtype}'s block size {bs}; use a "
            "recipe (q4_k_m ...) that falls back per tensor, or another qtype"
        )


def _check_values(x: torch.Tensor, qtype: str) -> None:
    """The Rust quantizer's input check (rust/core/src/quantize.rs): no NaN or Inf, and for ggml
    formats that store float16 no magnitude beyond 65504; the first bad value is named."""
    f16_stored = qtype not in ("f32", "bf16", TERNARY) and qtype_info(qtype).ggml_id is not None
    limit = 65504.0 if f16_stored else float(torch.finfo(torch.float32).max)
    bad = ~(x.abs() <= limit)  # NaN compares False
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        value = float(x[row, col])
        if np.isfinite(value):
            raise QuantizeError(
                f"value {value:g} at row {row}, column {col} is beyond {qtype}'s range "
                f"(|x| <= {limit:g})"
            )
        raise QuantizeError(f"value {value} at row {row}, column {col} is not finite")


def fake_quantize_weight(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantize(quantize(w, qtype)) as float32, the STE mask) for a 2-D weight [out, in]."""
    if w.dim() != 2:
        raise QuantizeError(f"a linear weight must be 2-D, got shape {tuple(w.shape)}")
    if qtype != TERNARY:
        qtype = qtype_info(qtype).name
        check_row_length(qtype, w.shape[1])
    x = w.detach().to(torch.float32)
    _check_values(x, qtype)
    if qtype == TERNARY:
        return ternary(x)
    if qtype not in TORCH_QTYPES:
        return _rust(w, qtype)
    if qtype == "f32":
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    if qtype in ("f16", "bf16"):
        dt = torch.float16 if qtype == "f16" else torch.bfloat16
        return x.to(dt).to(torch.float32), torch.ones_like(x, dtype=torch.bool)
    if qtype in ("int8", "fp8_e4m3", "fp8_e5m2"):
        return _scaled(x, qtype)
    bs = qtype_info(qtype).block_size
    xb = _blocks(x, bs)
    if qtype in ("q4_0", "q5_0"):
        v, keep = _legacy_sym(xb, 16 if qtype == "q4_0" else 32)
    elif qtype in ("q4_1", "q5_1"):
        v, keep = _legacy_min(xb, 16 if qtype == "q4_1" else 32)
    elif qtype == "q8_0":
        v, keep = _q8_0(xb)
    else:
        v, keep = _bnb4(xb, qtype)
    return v.reshape(x.shape), keep.reshape(x.shape)


def clip_mask(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """The STE mask alone, cheaply, for the kernel forward (whose values come from Rust): only
    q4_0 / q5_0 (the side opposite the block's largest magnitude reaches beyond the grid) and
    ternary clip; every other format's scale covers its block (absmax or min..max) or comes from
    ggml's own scale search (K-quants, iq4: mask all True). The largest magnitude's sign is taken
    from max / min, so on an exact tie of +a and -a in one block the mask may pick the other side
    than ggml's first-wins (the values never do: they are Rust's)."""
    if qtype == TERNARY:
        return ternary(w)[1]
    if qtype not in ("q4_0", "q5_0"):
        return torch.ones_like(w, dtype=torch.bool)
    half = 8 if qtype == "q4_0" else 16
    x = w.detach().to(torch.float32).reshape(-1, 32)
    hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    m = torch.where(hi >= -lo, hi, lo)
    v = x * _inverse(m / -float(half)) + (half + 0.5)
    return (v < 2 * half).reshape(w.shape)


# ------------------------------------------------------------------------- activations

# The activation each kernel uses (rust/core/src/matmul/mod.rs); None: float32 activations.
ACTIVATION = {
    **dict.fromkeys(("q4_0", "q5_0", "q8_0", "iq4_nl", "q4_1", "q5_1"), "q8_0"),
    **dict.fromkeys(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"), "q8_k"),
    **dict.fromkeys(("nf4", "int8"), "q16"),
}


def _act_q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0_ref (q8_1 has the same quants and scale)."""
    v, _ = _q8_0(x.reshape(-1, 32))
    return v


def _act_q8_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K_ref: iscale = -127 / max, q = min(127, nearest_int(iscale x)),
    d = 1 / iscale."""
    xb = x.reshape(-1, 256)
    m = _signed_absmax(xb)
    zero = m == 0
    iscale = -127.0 / torch.where(zero, 1.0, m)
    q = torch.round(iscale * xb).clamp(max=127)  # nearest_int: ties to even
    d = 1.0 / iscale
    return torch.where(zero, 0.0, q * d)


def _act_q16(x: torch.Tensor) -> torch.Tensor:
    """reference/q16.rs: blocks of 64 (zero padded), d = amax / 32767, q = roundf(x / d) clamped."""
    rows, k = x.shape
    pad = (-k) % 64
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(-1, 64)
    scale = xp.abs().amax(dim=1, keepdim=True) / 32767.0
    tiny = scale < torch.finfo(torch.float32).tiny
    inv = torch.where(tiny, 0.0, 1.0 / torch.where(tiny, 1.0, scale))
    q = _round_half_away(xp * inv).clamp(-32767, 32767)
    return (q * scale).reshape(rows, k + pad)[:, :k]


def fake_quantize_activation(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """The activations as the CPU kernel for weights of `qtype` rounds them (float32, x's shape);
    x itself (as float32) for formats whose kernel keeps float activations or has no kernel."""
    kind = ACTIVATION.get(qtype)
    xf = x.detach().to(torch.float32)
    if kind is None:
        return xf
    x2 = xf.reshape(-1, x.shape[-1])
    fn = {"q8_0": _act_q8_0, "q8_k": _act_q8_k, "q16": _act_q16}[kind]
    return fn(x2).reshape(x.shape)
