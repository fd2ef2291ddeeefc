"""The scalar reference of every KV-cache type, one group of 32 float32 values at a time, written
for clarity (numpy float32 scalars, so each operation rounds as IEEE single does). The torch fast
path (`codecs.py`) is tested bit-exact against these, and these against the peers that define
the formats: ferroquant's own `q8_0` / `q4_0` (themselves tested against libggml) and
`fp8_e4m3` (torch's cast), numpy's float16 for `f16`.

Each `*_group` function takes 32 float32 values and returns what the cache stores, and
`*_dequant` turns that back into 32 float32 values.
"""

from __future__ import annotations

import math

import numpy as np

GROUP = 32
KIVI_GROUP = 64  # the native runtime's KIVI group (docs/kv.md); the rule is the same at 32
F16_MAX = np.float32(65504.0)
FP8_MAX = np.float32(448.0)

f32 = np.float32


def _group(x: np.ndarray, sizes: tuple[int, ...] = (GROUP,)) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape not in [(n,) for n in sizes]:
        want = " or ".join(str(n) for n in sizes)
        raise ValueError(f"a reference group is {want} float32 values, got shape {x.shape}")
    return x


def c_to_i8(v: float) -> int:
    """C's `(int8_t)f` as gcc compiles it on x86-64 (cvttss2si, then the low byte): NaN and
    values outside int32 give INT32_MIN, whose low byte is 0. Reached only when 1/d overflowed
    (a block whose largest value is subnormal); the Rust core does the same (legacy.rs)."""
    i = -(2**31) if math.isnan(v) or not -(2.0**31) <= v < 2.0**31 else math.trunc(v)
    b = i & 0xFF
    return b - 256 if b >= 128 else b


def roundf(v: np.float32) -> int | float:
    """C's roundf: half away from zero (what ggml's q8_0 uses); infinities and NaN pass."""
    if not math.isfinite(float(v)):
        return float(v)
    r = math.trunc(float(v))
    if abs(float(v) - r) >= 0.5:
        r += 1 if v > 0 else -1
    return r


# ggml q8_0 (quantize_row_q8_0_ref / dequantize_row_q8_0)
def q8_0_group(x: np.ndarray) -> tuple[np.float16, np.ndarray]:
    x = _group(x)
    amax = f32(0)
    for v in x:
        amax = max(amax, abs(v))
    d = f32(amax / f32(127))
    with np.errstate(over="ignore", invalid="ignore"):  # 1/d overflows on subnormal blocks
        inv = f32(f32(1) / d) if d != 0 else f32(0)
        qs = np.array([c_to_i8(roundf(f32(v * inv))) for v in x], dtype=np.int8)
    return np.float16(d), qs


def q8_0_dequant(d: np.float16, qs: np.ndarray) -> np.ndarray:
    return np.array([f32(f32(int(q)) * f32(d)) for q in qs], dtype=np.float32)


# ggml q4_0 (quantize_row_q4_0_ref / dequantize_row_q4_0): element j in the low nibble of byte j,
# element j + 16 in its high nibble.
def q4_0_group(x: np.ndarray) -> tuple[np.float16, np.ndarray]:
    x = _group(x)
    amax, vmax = f32(0), f32(0)
    for v in x:
        if amax < abs(v):  # the first value of largest magnitude, with its sign
            amax, vmax = abs(v), v
    d = f32(vmax / f32(-8))
    with np.errstate(over="ignore", invalid="ignore"):  # 1/d overflows on subnormal blocks
        inv = f32(f32(1) / d) if d != 0 else f32(0)
        q = [min(15, c_to_i8(float(f32(f32(v * inv) + f32(8.5))))) & 0xFF for v in x]
    packed = np.array([(q[j] | (q[j + 16] << 4)) & 0xFF for j in range(16)], dtype=np.uint8)
    return np.float16(d), packed


def q4_0_dequant(d: np.float16, packed: np.ndarray) -> np.ndarray:
    q = [int(b) & 15 for b in packed] + [int(b) >> 4 for b in packed]
    return np.array([f32(f32(v - 8) * f32(d)) for v in q], dtype=np.float32)


# fp8_e4m3: ferroquant's fp8 format with a 32-value block (rust/core/src/formats/fp8.rs): the cast
# is torch's (the peer that defines float8_e4m3fn).
def fp8_group(x: np.ndarray) -> tuple[np.float32, np.ndarray]:
    import torch

    x = _group(x)
    amax = f32(0)
    for v in x:
        amax = max(amax, abs(v))
    scale = f32(amax / FP8_MAX)
    if scale == 0:
        scale = f32(1)
    scaled = np.array([f32(v / scale) for v in x], dtype=np.float32)
    q = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return scale, q


def fp8_dequant(scale: np.float32, q: np.ndarray) -> np.ndarray:
    import torch

    vals = torch.from_numpy(np.ascontiguousarray(q, dtype=np.uint8)).view(torch.float8_e4m3fn)
    return np.array([f32(f32(v) * scale) for v in vals.float().numpy()], dtype=np.float32)


# f16: IEEE half, round to nearest even (numpy's cast).
def f16_group(x: np.ndarray) -> np.ndarray:
    return _group(x).astype(np.float16)


# KIVI int4 / int2, asymmetric. The group is 32 (this cache) or 64 (the native runtime,
# KIVI_GROUP) consecutive tokens of one key channel, or consecutive channels of one value token.
# Scale and zero are stored as f16 (clamped to the f16 range first, so they stay finite); q is
# computed with the stored (f16) scale and zero.
def kivi_group(x: np.ndarray, bits: int) -> tuple[np.float16, np.float16, np.ndarray]:
    x = _group(x, (GROUP, KIVI_GROUP))
    levels = (1 << bits) - 1
    lo, hi = x[0], x[0]
    for v in x:
        lo, hi = min(lo, v), max(hi, v)
    scale = f32(f32(hi - lo) / f32(levels))
    s16 = np.float16(min(scale, F16_MAX))
    z16 = np.float16(min(max(lo, -F16_MAX), F16_MAX) + np.float32(0.0))  # -0.0 stored as +0.0
    s, z = f32(s16), f32(z16)
    q = np.zeros(x.size, dtype=np.uint8)
    if s != 0:
        for i, v in enumerate(x):
            t = f32(f32(v - z) / s)
            q[i] = int(min(max(np.rint(t), 0), levels))  # rint: half to even
    return s16, z16, q


def kivi_dequant(s16: np.float16, z16: np.float16, q: np.ndarray) -> np.ndarray:
    s, z = f32(s16), f32(z16)
    return np.array([f32(f32(f32(int(v)) * s) + z) for v in q], dtype=np.float32)


def roundtrip(kv_type: str, x: np.ndarray) -> np.ndarray:
    """Dequantize(quantize(x)) of one group of 32 values (for KIVI types: one key channel's 32
    or 64 tokens or one value token's 32 or 64 channels)."""
    if kv_type == "f32":
        return _group(x).copy()
    if kv_type == "f16":
        return f16_group(x).astype(np.float32)
    if kv_type == "q8_0":
        return q8_0_dequant(*q8_0_group(x))
    if kv_type == "q4_0":
        return q4_0_dequant(*q4_0_group(x))
    if kv_type == "fp8_e4m3":
        return fp8_dequant(*fp8_group(x))
    if kv_type in ("int4", "int2"):
        return kivi_dequant(*kivi_group(x, int(kv_type[3])))
    raise ValueError(f"unknown kv_type {kv_type!r}")


# The rotation (rotate.py, the runtime's kv/rotate.rs): the normalized Walsh-Hadamard transform
# of one head's head_dim values, butterfly level h = 1, 2, 4, ...: (a, b) -> (a + b, a - b) for
# the pairs (i, i + h) of each block of 2h values, then every value times f32(1 / sqrt(n)).
def wht(x: np.ndarray) -> np.ndarray:
    v = [f32(a) for a in np.asarray(x, dtype=np.float32)]
    n = len(v)
    if n == 0 or n & (n - 1):
        raise ValueError(f"a rotation needs a power-of-two length, got {n}")
    h = 1
    while h < n:
        for start in range(0, n, 2 * h):
            for i in range(start, start + h):
                a, b = v[i], v[i + h]
                v[i], v[i + h] = f32(a + b), f32(a - b)
        h *= 2
    norm = f32(f32(1) / np.sqrt(f32(n)))
    return np.array([f32(a * norm) for a in v], dtype=np.float32)


# The KIVI cache's rules over a whole stream (cache.py; docs/kv.md, "Sinks and window"), for one
# (batch, head) of float32 states x (n_tokens, head_dim):
# - a token is stored rotated (`wht` per token) when `rotate`, in the model's dtype (float32 here);
# - the first `sinks` tokens stay in full precision for good;
# - key group g (tokens gG .. gG+G-1) is quantized once N >= G (g + 1) + `residual` tokens
#   exist, per channel, its sink tokens replaced by token `sinks`'s values (so they are left out
#   of the range); values per token over groups of G channels (sink rows: token `sinks`'s);
# - attention after a call of the tokens start .. N-1 sees the groups quantized when the call's
#   first token was appended (N = start + 1; a one-token decode step: after it), dequantized and
#   rotated back, the sinks and all later tokens in full precision (rotated there and back), and
#   the call's own tokens exactly as given.
def kivi_stream_states(
    kv_type: str,
    x: np.ndarray,
    role: str,
    start: int,
    sinks: int,
    residual: int,
    group: int,
    rotate: bool,
) -> np.ndarray:
    """The states attention reads after the call that appended tokens start .. len(x) - 1."""
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    stored = np.array([wht(row) for row in x]) if rotate else x.copy()
    back = (lambda r: wht(r)) if rotate else (lambda r: r.copy())
    out = np.array([back(row) for row in stored], dtype=np.float32).reshape(n, d)
    visible = group * max(0, (start + 1 - residual) // group)
    for g0 in range(0, visible, group):
        block = stored[g0 : g0 + group].copy()
        if g0 == 0 and sinks:
            block[:sinks] = block[sinks]
        deq = np.empty_like(block)
        if role == "k":
            for c in range(d):
                deq[:, c] = roundtrip(kv_type, block[:, c])
        else:
            for t in range(group):
                for c in range(0, d, group):
                    deq[t, c : c + group] = roundtrip(kv_type, block[t, c : c + group])
        for t in range(group):
            if g0 + t >= sinks:
                out[g0 + t] = back(deq[t])
    out[start:] = x[start:]
    return out
