"""What the CUDA op checks before it launches anything: the same facts the CPU op checks (the
weight's byte count and statistics count for its format and shape, dtypes), plus what only a GPU
launch needs (every tensor on the same CUDA device). A call that passes cannot make a kernel read
past the end of a buffer; one that fails raises `QuantizeError` naming the argument.

Pure functions of shapes, dtypes and devices: the tests call them with meta tensors and stand-in
objects, no GPU needed. Contiguity and 16-byte alignment are not errors: the shim copies a view
that is not contiguous or not aligned (qmatmul.py), so they never reach a kernel.
"""

from __future__ import annotations

from typing import Any

from .._native import QuantizeError
from ..qtypes import BNB_QTYPES, SCALED_QTYPES, gint_params, is_float_zero, qtype_info

# The op's qtype may name the GPU layout of a ggml weight: "q4_k+split" (see layout in qmatmul.py).
SPLIT_SUFFIX = "+split"


def base_qtype(qtype: str) -> tuple[str, bool]:
    """("q4_k", True) for "q4_k+split"; (qtype, False) otherwise."""
    if qtype.endswith(SPLIT_SUFFIX):
        return qtype[: -len(SPLIT_SUFFIX)], True
    return qtype, False


def expected_sizes(qtype: str, n: int, k: int, block_size: int, scale_mode: str) -> tuple[int, int]:
    """(bytes of the weight, float32 statistics) of an n x k weight in `qtype`, as
    `ferroquant.quantize` lays it out; QuantizeError for a shape the format cannot hold."""
    info = qtype_info(qtype)
    if n <= 0 or k <= 0:
        raise QuantizeError(f"{qtype} weight shape {n}x{k}: both dimensions must be positive")
    if qtype in BNB_QTYPES:
        _positive_block(qtype, block_size)
        if k % block_size:
            raise QuantizeError(
                f"{qtype}: row length {k} is not a multiple of the block size {block_size}"
            )
        return n * k // 2, n * k // block_size
    if qtype in SCALED_QTYPES:
        mode = scale_mode or "row"
        if mode == "row":
            return n * k, n
        if mode == "tensor":
            return n * k, 1
        if mode == "block":
            _positive_block(qtype, block_size)
            if k % block_size:
                raise QuantizeError(
                    f"{qtype}: row length {k} is not a multiple of the block size {block_size}"
                )
            return n * k, n * k // block_size
        raise QuantizeError(f"{qtype}: scale_mode must be row, tensor or block, got {mode!r}")
    if is_float_zero(qtype):  # float zeros: an fp16-valued scale and zero per group
        if k % info.block_size:
            raise QuantizeError(
                f"{qtype}: row length {k} is not a multiple of its group {info.block_size}"
            )
        return n * k // info.block_size * info.type_size, 2 * n * (k // info.block_size)
    gint = gint_params(qtype)
    if gint is not None:  # grouped integers: f32 scale (and zero) per group of `group` columns
        group = gint.group or k
        if k % group or k % info.block_size:
            raise QuantizeError(
                f"{qtype}: row length {k} is not a multiple of its group {group} "
                f"(and of {info.block_size}, its packing)"
            )
        return n * k // info.block_size * info.type_size, n * (k // group) * (1 if gint.sym else 2)
    if k % info.block_size:
        raise QuantizeError(
            f"{qtype}: row length {k} is not a multiple of its block size {info.block_size}"
        )
    return n * k // info.block_size * info.type_size, 0


def _positive_block(qtype: str, block_size: int) -> None:
    if block_size <= 0:
        raise QuantizeError(f"{qtype}: block_size must be positive, got {block_size}")


def validate(
    x: Any, data: Any, stats: Any, qtype: str, n: int, k: int, block_size: int, scale_mode: str,
    device_type: str = "cuda",
) -> None:  # fmt: skip
    """Raise QuantizeError unless y = x @ W.T can be computed from these arguments: x [..., k]
    floating, data uint8 with exactly the format's byte count (either layout), stats floating
    with exactly its statistics count, all on one `device_type` device."""
    import torch

    base, _split = base_qtype(qtype)
    qtype_info(base)  # QuantizeError naming the known qtypes
    if not x.shape or x.shape[-1] != k:
        raise QuantizeError(
            f"x has shape {tuple(x.shape)}; its last dimension must be the weight's {k} input "
            "features"
        )
    if not x.dtype.is_floating_point:
        raise QuantizeError(f"x must be a floating-point tensor, got {x.dtype}")
    if data.dtype != torch.uint8:
        raise QuantizeError(f"the {base} weight data must be uint8 bytes, got {data.dtype}")
    nbytes, nstats = expected_sizes(base, n, k, block_size, scale_mode)
    if data.numel() != nbytes:
        raise QuantizeError(
            f"the {base} weight data has {data.numel()} bytes; a {n}x{k} {base} weight "
            f"(block size {block_size}, scale mode {scale_mode or 'default'}) has {nbytes}"
        )
    if nstats and stats.numel() != nstats:
        raise QuantizeError(
            f"the {base} weight has {stats.numel()} statistics; a {n}x{k} weight (block size "
            f"{block_size}, scale mode {scale_mode or 'default'}) needs {nstats}"
        )
    if nstats and not stats.dtype.is_floating_point:
        raise QuantizeError(f"the {base} statistics must be floating point, got {stats.dtype}")
    dev = x.device
    if dev.type != device_type:
        raise QuantizeError(f"x is on {dev}, expected a {device_type} device")
    named = (("weight data", data), ("statistics", stats)) if nstats else (("weight data", data),)
    for what, t in named:
        if t.device != dev:
            raise QuantizeError(f"the {what} is on {t.device} but x is on {dev}: move both")


def validate_out(out: Any, m: int, n: int, dtype: Any, device: Any) -> None:
    """`out` of qmatmul_cuda / dequantize: contiguous (m, n) of `dtype` on `device`, 16-byte
    aligned (the kernels store 16 bytes at a time)."""
    if (
        tuple(out.shape) != (m, n) or out.dtype != dtype or not out.is_contiguous()
        or out.device != device or out.data_ptr() % 16
    ):  # fmt: skip
        raise QuantizeError(
            f"out must be a contiguous, 16-byte aligned ({m}, {n}) {dtype} tensor on {device}; "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
