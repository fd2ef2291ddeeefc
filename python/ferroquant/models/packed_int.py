"""The grouped integer tensors of the ecosystem's checkpoints <-> ferroquant's `int*_g*` qtypes.

Pure numpy, both directions, exact (codes, integer zeros and fp16 scales are copied, never
requantized):

- GPTQ (`quant_method: gptq`, `checkpoint_format: gptq`, GPTQModel / AutoGPTQ / transformers):
  `qweight` int32 [K * bits / 32, N]: each output column's K codes as one little-endian bit
  stream cut into int32 words (8 four-bit codes a word; 3 bits: 32 codes in 3 words, codes
  straddling words); `qzeros` int32 [groups, N * bits / 32]: the zeros minus one (the format's
  "v1" offset), packed the same way along N; `scales` fp16 [groups, N]; `g_idx` int32 [K]
  (`i // group` without act-order).
- AWQ GEMM (AutoAWQ, `version: gemm`): `qweight` int32 [K, N / 8]: word `c` of row `k` holds
  columns `8c + [0, 2, 4, 6, 1, 3, 5, 7]` in nibbles 0..7; `qzeros` int32 [groups, N / 8] the
  same packing of the zeros (no offset); `scales` fp16 [groups, N]. 4 bits, asymmetric.

ferroquant's layout (`rust/core/src/formats/gint.rs`): per output row the K codes as one
little-endian bit stream of bytes; stats per row = the group scales, then (asymmetric) zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..qtypes import float_zero_refusal, gint_name, gint_params, is_float_zero
from ..tensor import QTensor, QuantizeError

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def _stream_unpack(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """The `count` codes of `bits` bits along `axis` of little-endian words (uint8 or int32)."""
    w = np.moveaxis(np.ascontiguousarray(words), axis, -1)
    raw = np.ascontiguousarray(w).view(np.uint8)  # little-endian bytes, in order along axis
    b = np.unpackbits(raw, axis=-1, bitorder="little")[..., : count * bits]
    b = b.reshape(*b.shape[:-1], count, bits).astype(np.int64)
    codes = (b << np.arange(bits)).sum(-1)
    return np.moveaxis(codes, -1, axis)


def _stream_pack(codes: np.ndarray, bits: int, axis: int, dtype: Any) -> np.ndarray:
    """Codes along `axis` as a little-endian bit stream of `dtype` words (uint8 or int32)."""
    c = np.moveaxis(np.asarray(codes, np.int64), axis, -1)
    n = c.shape[-1]
    word_bits = np.dtype(dtype).itemsize * 8
    if (n * bits) % word_bits:
        raise QuantizeError(
            f"{n} codes of {bits} bits do not fill whole {word_bits}-bit words "
            f"(a multiple of {word_bits // np.gcd(bits, word_bits)} is needed)"
        )
    b = ((c[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(*c.shape[:-1], -1)
    raw = np.packbits(b, axis=-1, bitorder="little")
    out = np.ascontiguousarray(raw).view(np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return np.moveaxis(out, -1, axis)


def _parts(qt: QTensor) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """(params, codes [N, K], scales [N, groups] f32, zeros [N, groups] int64) of a gint tensor."""
    gi = gint_params(qt.qtype)
    if is_float_zero(qt.qtype):
        raise QuantizeError(float_zero_refusal(qt.qtype, "a GPTQ / AWQ tensor"))
    if gi is None:
        raise QuantizeError(f"{qt.qtype} is not a grouped integer qtype (int*_g*)")
    n, k = qt.shape
    groups = k // qt.block_size
    codes = _stream_unpack(np.asarray(qt.data, np.uint8).reshape(n, -1), gi.bits, k, 1)
    st = np.asarray(qt.stats, np.float32).reshape(n, -1)
    scales = st[:, :groups]
    zeros = (np.full((n, groups), 1 << (gi.bits - 1)) if gi.sym
             else st[:, groups:].astype(np.int64))  # fmt: skip
    return gi, codes, scales, zeros


def _qtensor(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group: int,
             sym: bool | None) -> QTensor:  # fmt: skip
    """A gint QTensor from codes [N, K], scales [N, groups] and zeros [N, groups]; `sym=None`
    takes the symmetric qtype when every zero is 2^(bits-1)."""
    n, k = codes.shape
    center = 1 << (bits - 1)
    if sym is None:
        sym = bits == 8 or bool(np.all(zeros == center))
    if sym and not np.all(zeros == center):
        raise QuantizeError(
            f"{bits}-bit weights with zero points other than {center} have no ferroquant "
            f"qtype (8-bit grouped integers are symmetric only)"
        )
    gl = k // scales.shape[1]
    name = gint_name(bits, 0 if group in (-1, 0) else gl, sym)
    data = _stream_pack(codes, bits, 1, np.uint8).reshape(-1)
    stats = scales.astype(np.float32) if sym else np.concatenate(
        [scales.astype(np.float32), zeros.astype(np.float32)], axis=1)  # fmt: skip
    return QTensor(name, (n, k), data, gl, np.ascontiguousarray(stats).reshape(-1))


def _check_codes(codes: np.ndarray, zeros: np.ndarray, bits: int, what: str) -> None:
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= 1 << bits:
        raise QuantizeError(f"{what}: codes outside 0..{(1 << bits) - 1}")
    if zeros.min(initial=0) < 0 or zeros.max(initial=0) >= 1 << bits:
        raise QuantizeError(f"{what}: zero points outside 0..{(1 << bits) - 1}")


# ---- GPTQ ------------------------------------------------------------------------------------


def to_gptq(qt: QTensor) -> dict[str, np.ndarray]:
    """`qweight`, `qzeros`, `scales`, `g_idx` of a gint tensor in GPTQ's v1 checkpoint format."""
    gi, codes, scales, zeros = _parts(qt)
    n, k = qt.shape
    mask = (1 << gi.bits) - 1
    return {
        "qweight": _stream_pack(codes.T, gi.bits, 0, np.int32),
        "qzeros": _stream_pack((zeros.T - 1) & mask, gi.bits, 1, np.int32),
        "scales": scales.T.astype(np.float16),
        "g_idx": (np.arange(k) // qt.block_size).astype(np.int32),
    }


def from_gptq(t: dict[str, Any], bits: int, group_size: int, sym: bool | None = None,
              name: str = "") -> QTensor:  # fmt: skip
    """A gint tensor from a GPTQ v1 module's tensors (numpy or torch); the values are those
    GPTQModel dequantizes to. A permuted `g_idx` (act-order checkpoints) is refused."""
    qweight, qzeros = _np(t["qweight"]), _np(t["qzeros"])
    scales = _np(t["scales"]).astype(np.float32)
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape != (groups, n) or k % groups:
        raise QuantizeError(f"{name}: scales of shape {scales.shape} do not fit {n}x{k} weights")
    gl = k // groups
    if "g_idx" in t and t["g_idx"] is not None:
        g_idx = _np(t["g_idx"]).astype(np.int64)
        if g_idx.shape != (k,) or not np.array_equal(g_idx, np.arange(k) // gl):
            raise QuantizeError(
                f"{name}: g_idx is not i // {gl} (an act-order / desc_act checkpoint with "
                "permuted groups); ferroquant's grouped integers keep groups contiguous"
            )
    codes = _stream_unpack(qweight, bits, k, 0).T
    zeros = (_stream_unpack(qzeros, bits, n, 1).T + 1) & ((1 << bits) - 1)
    _check_codes(codes, zeros, bits, name)
    return _qtensor(codes, scales.T, zeros, bits, group_size, sym)


# ---- AWQ (GEMM) ------------------------------------------------------------------------------


def to_awq(qt: QTensor) -> dict[str, np.ndarray]:
    """`qweight`, `qzeros`, `scales` of a 4-bit gint tensor in AutoAWQ's GEMM format."""
    gi, codes, scales, zeros = _parts(qt)
    if gi.bits != 4:
        raise QuantizeError(f"AWQ's GEMM format holds 4-bit weights, not {qt.qtype}")
    n, _ = qt.shape
    if n % 8:
        raise QuantizeError(f"AWQ packs 8 output features a word; {n} is not a multiple of 8")

    def pack(v: np.ndarray) -> np.ndarray:  # [rows, N] -> [rows, N / 8]
        r = v.reshape(v.shape[0], n // 8, 8)[:, :, AWQ_ORDER].reshape(v.shape[0], n)
        return _stream_pack(r, 4, 1, np.int32)

    return {
        "qweight": pack(codes.T),
        "qzeros": pack(zeros.T),
        "scales": scales.T.astype(np.float16),
    }


def from_awq(t: dict[str, Any], bits: int, group_size: int, name: str = "") -> QTensor:
    """A gint tensor from an AWQ GEMM module's tensors (numpy or torch)."""
    if bits != 4:
        raise QuantizeError(f"{name}: AWQ's GEMM format holds 4-bit weights, got w_bit={bits}")
    qweight, qzeros = _np(t["qweight"]), _np(t["qzeros"])
    scales = _np(t["scales"]).astype(np.float32)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if scales.shape != (groups, n) or k % groups:
        raise QuantizeError(f"{name}: scales of shape {scales.shape} do not fit {n}x{k} weights")
    inv = np.argsort(AWQ_ORDER)

    def unpack(v: np.ndarray) -> np.ndarray:  # [rows, N / 8] -> [rows, N]
        c = _stream_unpack(v, 4, n, 1).reshape(v.shape[0], n // 8, 8)
        return c[:, :, inv].reshape(v.shape[0], n)

    codes, zeros = unpack(qweight).T, unpack(qzeros).T
    _check_codes(codes, zeros, 4, name)
    return _qtensor(codes, scales.T, zeros, 4, group_size, False)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)
