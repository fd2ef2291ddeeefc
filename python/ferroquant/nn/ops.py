"""torch integration: one custom op, `ferroquant::qmatmul`, computing y = x @ W.T for a quantized
W, with a CPU kernel (the Rust core), a reference fallback (dequantize, then F.linear) for
formats the kernels do not cover yet, and a fake implementation so torch.compile can trace it.

Autograd (QLoRA): the gradient flows to x only (the weight is frozen: bytes, not a parameter).
grad_x = grad_y @ W is a second op, `ferroquant::qmatmul_grad_input`, which dequantizes W for
the call and frees it: no float copy of the weight outlives a backward.

Training forward, `ferroquant::dequant_matmul` (QuantLinear uses it on the CPU when autograd
records the call): W dequantized for this call (the Rust reference, float32, then cast to a
compute dtype, bfloat16 by default), one torch GEMM, W dropped. The inference kernel rounds the
activations to its own blocks and is built for few rows; at the hundreds of rows of a training
batch the float GEMM is several times faster. Its output is therefore not bit-identical to the
kernel's (docs/training.md states the bound); its backward is `qmatmul_grad_input` in the same
compute dtype, i.e. exactly torch's autograd through `F.linear(x.to(dt), W.to(dt))`.

The op takes W as raw tensors (bytes in the reference layout, float32 statistics) plus the format
description, so it round-trips through state_dicts and needs no Python objects. A ggml weight
that QuantLinear has repacked for its GPU kernels arrives in the split layout, named by the qtype
"<qtype>+split" (ferroquant.cuda.qmatmul); every kernel here accepts both.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .. import _native
from ..cuda import qmatmul as cuda_ops
from ..tensor import QTensor, dequantize
from .openmp import torch_team


def _as_qtensor(
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
) -> QTensor:
    return QTensor(
        qtype=qtype,
        shape=(n, k),
        data=data.detach().cpu().numpy().reshape(-1),
        block_size=block_size,
        stats=stats.detach().cpu().numpy().reshape(-1).astype(np.float32, copy=False),
        scale_mode=scale_mode or None,
    )


# Asked once: the op runs on every forward of every QuantLinear.
_NATIVE_QTYPES = frozenset(_native.qmatmul_qtypes())


def native_kernel_available(qtype: str) -> bool:
    """True when the Rust core has a quantized matmul kernel for `qtype`."""
    return qtype in _NATIVE_QTYPES


def qmatmul_reference(
    x: torch.Tensor,
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
) -> torch.Tensor:
    """y[..., n] = x[..., k] @ W.T with W (n x k) quantized as `qtype`."""
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]}, the weight has {k} input features")
    data, qtype = cuda_ops.reference_layout(data, qtype, n, k)  # "<qtype>+split"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.device.type == "cpu" and native_kernel_available(qtype):
        xf = x2.detach().to(torch.float32).contiguous().numpy()
        y = _native.qmatmul(
            xf,
            data.detach().contiguous().numpy().reshape(-1),
            qtype,
            n,
            k,
            block_size,
            stats.detach().contiguous().numpy().reshape(-1),
            scale_mode or None,
            openmp=torch_team(),
        )
        out = torch.from_numpy(np.asarray(y)).to(x.dtype)
    else:
        w = torch.from_numpy(
            dequantize(_as_qtensor(data, stats, qtype, n, k, block_size, scale_mode))
        )
        out = torch.nn.functional.linear(x2, w.to(device=x.device, dtype=x.dtype))
    return out.reshape(*lead, n)


@torch.library.custom_op("ferroquant::qmatmul", mutates_args=())
def qmatmul(
    x: torch.Tensor,
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
) -> torch.Tensor:
    """y[..., n] = x[..., k] @ W.T with W (n x k) quantized as `qtype`."""
    return qmatmul_reference(x, data, stats, qtype, n, k, block_size, scale_mode)


# The CUDA kernel (ferroquant.cuda.qmatmul; importing it touches no GPU): the kernels, else
# dequantize on the GPU + torch matmul.
cuda_ops.register(qmatmul)


@qmatmul.register_fake
def _(x, data, stats, qtype, n, k, block_size, scale_mode):
    return x.new_empty((*x.shape[:-1], n))


# Dequantized weights of the training path land in one reused buffer per thread and dtype
# (the size of the largest weight seen: 1.7 MB for SmolLM2 in bfloat16), not in a fresh
# allocation per call: a fresh float matrix per call costs more in page faults than the
# dequantization itself, twice per weight and step. Nothing is cached: every call rewrites it.
_SCRATCH = threading.local()
# torch dtype -> the numpy dtype `_native.dequantize_into` writes (bfloat16 as its bits)
_INTO_DTYPES = {torch.float32: torch.float32, torch.bfloat16: torch.uint16}


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _dequantized_weight(
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """W (n x k) for one call: the Rust reference's float32 values, cast (round to nearest
    even) to `dtype` on `device`. On the CPU in float32 or bfloat16 it is written straight into
    this thread's scratch buffer (`_native.dequantize_into`, the same values and rounding as
    torch's cast): valid until the next call on this thread."""
    data, qtype = cuda_ops.reference_layout(data, qtype, n, k)  # "<qtype>+split"
    if device.type == "cpu" and dtype in _INTO_DTYPES and data.device.type == "cpu":
        w = _scratch(n * k, dtype)
        _native.dequantize_into(
            data.detach().contiguous().numpy().reshape(-1),
            qtype,
            n,
            k,
            block_size,
            stats.detach().to(torch.float32).contiguous().numpy().reshape(-1),
            scale_mode or None,
            w.view(_INTO_DTYPES[dtype]).numpy(),
        )
        return w.view(n, k)
    w = torch.from_numpy(dequantize(_as_qtensor(data, stats, qtype, n, k, block_size, scale_mode)))
    return w.to(device=device, dtype=dtype)


def qmatmul_grad_input_reference(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """grad_x[..., k] = grad_y[..., n] @ W with W (n x k) quantized as `qtype`: the weight is
    dequantized (the Rust reference, float32, cast to `compute_dtype` with grad_y) for this call
    only, then dropped."""
    if grad_y.shape[-1] != n:
        raise ValueError(f"grad_y has last dimension {grad_y.shape[-1]}, the weight has {n} rows")
    w = _dequantized_weight(data, stats, qtype, n, k, block_size, scale_mode, compute_dtype,
                            grad_y.device)  # fmt: skip
    out = grad_y.reshape(-1, n).to(compute_dtype) @ w
    del w
    return out.to(grad_y.dtype).reshape(*grad_y.shape[:-1], k)


@torch.library.custom_op("ferroquant::qmatmul_grad_input", mutates_args=())
def qmatmul_grad_input(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """grad_x[..., k] = grad_y[..., n] @ W with W (n x k) quantized as `qtype`, computed in
    `compute_dtype`."""
    return qmatmul_grad_input_reference(
        grad_y, data, stats, qtype, n, k, block_size, scale_mode, compute_dtype
    )


@qmatmul_grad_input.register_fake
def _(grad_y, data, stats, qtype, n, k, block_size, scale_mode, compute_dtype):
    return grad_y.new_empty((*grad_y.shape[:-1], k))


def dequant_matmul_reference(
    x: torch.Tensor,
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """y[..., n] = (x.to(compute_dtype) @ W.to(compute_dtype).T).to(x.dtype), W dequantized for
    this call only."""
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]}, the weight has {k} input features")
    w = _dequantized_weight(data, stats, qtype, n, k, block_size, scale_mode, compute_dtype,
                            x.device)  # fmt: skip
    y = torch.nn.functional.linear(x.reshape(-1, k).to(compute_dtype), w)
    del w
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("ferroquant::dequant_matmul", mutates_args=())
def dequant_matmul(
    x: torch.Tensor,
    data: torch.Tensor,
    stats: torch.Tensor,
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    scale_mode: str,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """y[..., n] = x[..., k] @ W.T through a dequantized W (the training forward)."""
    return dequant_matmul_reference(x, data, stats, qtype, n, k, block_size, scale_mode,
                                    compute_dtype)  # fmt: skip


@dequant_matmul.register_fake
def _(x, data, stats, qtype, n, k, block_size, scale_mode, compute_dtype):
    return x.new_empty((*x.shape[:-1], n))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's autograd signature)
    x, data, stats, qtype, n, k, block_size, scale_mode, *dtype = inputs
    ctx.save_for_backward(data, stats)  # the quantized bytes: already held by the module
    # the kernel op's backward runs in float32; dequant_matmul's in its own compute dtype
    ctx.fmt = (qtype, n, k, block_size, scale_mode, dtype[0] if dtype else torch.float32)


def _backward(ctx, grad_y):  # noqa: ANN001, ANN202
    grad_x = None
    if ctx.needs_input_grad[0]:
        data, stats = ctx.saved_tensors
        grad_x = qmatmul_grad_input(grad_y.contiguous(), data, stats, *ctx.fmt)
    return (grad_x,) + (None,) * (len(ctx.needs_input_grad) - 1)


# The weight bytes and statistics get no gradient: QuantLinear's weight is frozen.
qmatmul.register_autograd(_backward, setup_context=_setup_context)
dequant_matmul.register_autograd(_backward, setup_context=_setup_context)
