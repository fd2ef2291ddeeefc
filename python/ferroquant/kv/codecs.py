"""The torch fast path of every KV-cache type: whole (batch, head, token, head_dim) tensors at
once, bit-exact with the scalar reference in `reference.py` (tests/test_kv.py).

`encode(kind, x)` turns float32 states `x` of shape (B, H, n, D) into the stored parts, each a
tensor whose dim 2 is the row the cache appends along (a token; for KIVI keys a 32-token group);
`decode(kind, parts, out)` writes their float32 values into `out` (B, H, n, D), which may be a
view into a larger buffer, so that decoding allocates nothing of the cache's size.
`kind` is a name of `types.KV_TYPES`; `role` ("k" or "v") matters for `int4` / `int2` only.
`group` (default 32) is the KIVI group: tokens per key group and channels per value group (the
ggml types keep their 32-value blocks); the native runtime may align it (e.g. 64) at merge.
"""

from __future__ import annotations

import torch

GROUP = 32
FP8_MAX = 448.0
F16_MAX = 65504.0


def _blocks(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """(B, H, n, D) -> (B, H, n, D/group, group): blocks along head_dim."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n, d // group, group)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero); torch.round rounds half to even."""
    t = v.trunc()
    return t + ((v - t).abs() >= 0.5).to(v.dtype) * v.sign()


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / d, torch.zeros_like(d))


# ---------------------------------------------------------------------------- per-token types
def _encode_q8_0(x: torch.Tensor) -> dict[str, torch.Tensor]:
    xb = _blocks(x)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    # a subnormal block's 1/d is inf: C's (int8_t) of inf / NaN is 0 on x86-64 (reference.c_to_i8)
    v = _roundf(xb * _safe_inverse(d))
    qs = torch.where(v.isfinite(), v, 0.0).to(torch.int8)
    return {"qs": qs.flatten(-2), "d": d.squeeze(-1).to(torch.float16)}


def _decode_q8_0(p: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    d = p["d"].float().unsqueeze(-1)
    torch.mul(_blocks(p["qs"]), d, out=_blocks(out))


def _encode_q4_0(x: torch.Tensor) -> dict[str, torch.Tensor]:
    xb = _blocks(x)
    # ggml keeps the first value of largest magnitude, sign included (argmax returns the first)
    idx = xb.abs().argmax(-1, keepdim=True)
    d = xb.gather(-1, idx) / -8.0
    v = (xb * _safe_inverse(d) + 8.5).trunc()
    q = torch.where(v.isfinite(), v, 0.0).clamp(max=15).to(torch.uint8)  # as in _encode_q8_0
    packed = q[..., :16] | (q[..., 16:] << 4)
    return {"qs": packed.flatten(-2), "d": d.squeeze(-1).to(torch.float16)}


def _unpack4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Byte j holds element j (low nibble) and element j + half (high nibble) along `dim`."""
    return torch.cat([packed & 15, packed >> 4], dim=dim)


def _decode_q4_0(p: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    b, h, n, _ = out.shape
    packed = p["qs"].reshape(b, h, n, -1, GROUP // 2)
    q = _unpack4(packed, -1).to(torch.int8) - 8
    torch.mul(q, p["d"].float().unsqueeze(-1), out=_blocks(out))


def _encode_fp8(x: torch.Tensor) -> dict[str, torch.Tensor]:
    xb = _blocks(x)
    scale = xb.abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (xb / scale).to(torch.float8_e4m3fn)
    return {"q": q.flatten(-2), "scale": scale.squeeze(-1)}


def _decode_fp8(p: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    ob = _blocks(out)
    ob.copy_(_blocks(p["q"]))
    ob.mul_(p["scale"].unsqueeze(-1))


# --------------------------------------------------------------------------------- KIVI types
def _kivi_quantize(
    xg: torch.Tensor, bits: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of the 32-value groups along `dim` of `xg` (float32):
    (q uint8, scale f16, zero f16) with scale and zero keeping `dim` as size 1."""
    levels = (1 << bits) - 1
    lo = xg.amin(dim, keepdim=True)
    hi = xg.amax(dim, keepdim=True)
    s16 = ((hi - lo) / float(levels)).clamp(max=F16_MAX).to(torch.float16)
    z16 = (lo.clamp(-F16_MAX, F16_MAX) + 0.0).to(torch.float16)  # + 0.0: -0.0 is stored as +0.0
    s, z = s16.float(), z16.float()
    q = ((xg - z) / s).round().clamp(0, levels)  # round: half to even
    q = torch.where(s != 0, q, torch.zeros_like(q)).to(torch.uint8)
    return q, s16, z16


def _pack(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """32 values along `dim` -> 32 * bits / 8 bytes: byte j holds elements j, j + m, j + 2m, ...
    (m = bytes per group) from the lowest bits up, as ggml's q4_0 packs its nibbles."""
    parts = q.chunk(8 // bits, dim=dim)
    packed = parts[0].clone()
    for i, part in enumerate(parts[1:], start=1):
        packed |= part << (bits * i)
    return packed


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    if bits == 4:
        return _unpack4(packed, dim)
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)], dim=dim)


def _encode_kivi(x: torch.Tensor, bits: int, role: str, group: int) -> dict[str, torch.Tensor]:
    b, h, n, d = x.shape
    if x.is_cpu and group * bits % 8 == 0 and (n if role == "k" else d) % group == 0:
        return _encode_kivi_native(x, bits, role, group)
    return _encode_kivi_torch(x, bits, role, group)


def _encode_kivi_native(
    x: torch.Tensor, bits: int, role: str, group: int
) -> dict[str, torch.Tensor]:
    """`_encode_kivi_torch`'s parts from one native call (`_native.kv_kivi_encode`; bit-exact
    with it and with the reference, tests/test_kv.py)."""
    from .. import _native

    b, h, n, d = x.shape
    pack = group * bits // 8
    if role == "k":
        shapes = (b, h, n // group, pack, d), (b, h, n // group, 1, d)
    else:
        shapes = (b, h, n, d // group, pack), (b, h, n, d // group, 1)
    q = torch.empty(shapes[0], dtype=torch.uint8)
    s, z = (torch.empty(shapes[1], dtype=torch.float16) for _ in range(2))
    xs = x.detach().contiguous().numpy()
    _native.kv_kivi_encode(f"int{bits}", group, role, xs, _u8(q), _u8(s), _u8(z))
    return {"q": q, "scale": s, "zero": z}


def _u8(t: torch.Tensor) -> object:
    """A contiguous CPU tensor's bytes as a flat numpy uint8 view."""
    return t.view(-1).view(torch.uint8).numpy()


def _encode_kivi_torch(
    x: torch.Tensor, bits: int, role: str, group: int
) -> dict[str, torch.Tensor]:
    """The torch ops of KIVI's encoder (any device)."""
    b, h, n, d = x.shape
    if role == "k":  # per channel over token groups: rows are groups
        xg = x.reshape(b, h, n // group, group, d)
        q, s, z = _kivi_quantize(xg, bits, dim=3)
        return {"q": _pack(q, bits, dim=3), "scale": s, "zero": z}
    xg = _blocks(x, group)  # per token over channel groups: rows are tokens
    q, s, z = _kivi_quantize(xg, bits, dim=4)
    return {"q": _pack(q, bits, dim=4), "scale": s, "zero": z}


def _decode_kivi(
    p: dict[str, torch.Tensor], out: torch.Tensor, bits: int, role: str, group: int
) -> None:
    b, h, n, d = out.shape
    if role == "k":
        q = _unpack(p["q"], bits, dim=3)
        view = out.view(b, h, n // group, group, d)
    else:
        q = _unpack(p["q"], bits, dim=4)
        view = _blocks(out, group)
    # q * scale, then + zero: two float32 roundings, as the reference (no fused multiply-add)
    torch.mul(q, p["scale"].float(), out=view)
    view.add_(p["zero"].float())


# ------------------------------------------------------------------------------------ dispatch
def encode(
    kind: str, x: torch.Tensor, role: str = "k", group: int = GROUP
) -> dict[str, torch.Tensor]:
    """The stored parts of float32 states `x` (B, H, n, D); n % group == 0 for int4 / int2."""
    x = x.float()
    if kind == "f32":
        return {"x": x.clone()}
    if kind == "f16":
        return {"x": x.to(torch.float16)}
    if kind == "q8_0":
        return _encode_q8_0(x)
    if kind == "q4_0":
        return _encode_q4_0(x)
    if kind == "fp8_e4m3":
        return _encode_fp8(x)
    if kind in ("int4", "int2"):
        return _encode_kivi(x, int(kind[3]), role, group)
    raise ValueError(f"unknown kv_type {kind!r}")


def decode(
    kind: str,
    parts: dict[str, torch.Tensor],
    out: torch.Tensor,
    role: str = "k",
    group: int = GROUP,
) -> None:
    """Write the float32 values of `parts` into `out` (float32, (B, H, n, D), may be a view)."""
    if kind in ("f32", "f16"):
        out.copy_(parts["x"])
    elif kind == "q8_0":
        _decode_q8_0(parts, out)
    elif kind == "q4_0":
        _decode_q4_0(parts, out)
    elif kind == "fp8_e4m3":
        _decode_fp8(parts, out)
    elif kind in ("int4", "int2"):
        _decode_kivi(parts, out, int(kind[3]), role, group)
    else:
        raise ValueError(f"unknown kv_type {kind!r}")


def rows(kind: str, role: str, tokens: int, group: int = GROUP) -> int:
    """How many rows (dim 2 of the parts) `tokens` tokens take."""
    return tokens // group if kind in ("int4", "int2") and role == "k" else tokens
