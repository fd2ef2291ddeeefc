"""The CUDA kernel of `ferroquant::qmatmul` (registered by ops.py; importing this module touches
no GPU).

M <= 16 tokens: the fused GEMV kernel (the weight is read once and serves every token), or, from
`FERROQUANT_CUDA_MMA_MIN_M` tokens on (unset: never, until a GPU run has measured where it wins),
the tensor-core kernel (weights decoded to bf16/fp16 in registers, mma.sync, split-K into an fp32
workspace reduced in a fixed order). Larger M: the dequantize kernel writes W in x's dtype into a
workspace from torch's caching allocator, then F.linear (cuBLAS). Formats without kernels, float32
activations, or shapes the kernels do not take (nf4/int8 with K % 32 != 0) use the reference path
of ops.py.

Weight layouts (see cuda_src/qmatmul.cu): nf4 and int8 are read as stored, with their float32
statistics (a double-quantized nf4 checkpoint arrives here with its absmax already expanded to
float32, by QuantLinear.from_qtensor). The ggml formats are read in the "split" layout: the same
bytes, the quant bytes of every block first, then every block's remaining bytes (`to_split` /
`from_split`, reversible). The split copy is made once per weight, on its first CUDA call, and
kept (weakly keyed by the weight tensor, re-made when the tensor is modified in place): run a
layer once before capturing it in a CUDA graph, as torch's graph warm-up does anyway; a first call
inside a capture is an error rather than a silent capture of the repack.

The launch path makes no host synchronisation and allocates only through torch.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .. import _native
from ..qtypes import qtype_info
from . import nvrtc as _cuda

# Lane steps per block (SPB) of each ggml format's kernels: the one number that is the kernels'
# own. Everything else about the block comes from the Rust core's table.
_GGML_LANE_STEPS = {"q4_0": 1, "q8_0": 2, "q4_k": 8, "q5_k": 8, "q6_k": 8}


def _ggml_split() -> dict[str, tuple[int, int, int, int, int]]:
    """qtype -> (weights per block QK, bytes per block, offset of the quant bytes QB, QB, SPB),
    from the Rust qtype table and block structs. The meta bytes are the rest of the block, in
    their original order."""
    spans = {name: (offset, length) for name, offset, length in _native.block_quant_spans()}
    split = {}
    for qtype, spb in _GGML_LANE_STEPS.items():
        info = qtype_info(qtype)
        offset, length = spans[qtype]
        split[qtype] = (info.block_size, info.type_size, offset, length, spb)
    return split


GGML_SPLIT = _ggml_split()
# nf4 / int8: (QK, SPB) of the kernels' pseudo-blocks.
FLAT = {"nf4": (32, 1), "int8": (32, 2)}
MAX_GEMV_M = 16
PATHS = ("gemv", "mma", "dequant")
MMA_WARPS_PER_SM = 16  # split-K aims for this many mma warps per SM
_ACT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def to_split(data: torch.Tensor, qtype: str, n: int, k: int) -> torch.Tensor:
    """ggml rows (n x k weights) -> the split layout: [quant bytes of every block][meta bytes of
    every block], same size and device."""
    qk, bpb, off, qb, _ = GGML_SPLIT[qtype]
    blocks = data.reshape(n * (k // qk), bpb)
    quant = blocks[:, off : off + qb]
    meta = torch.cat([blocks[:, :off], blocks[:, off + qb :]], dim=1)
    return torch.cat([quant.reshape(-1), meta.reshape(-1)])


def from_split(split: torch.Tensor, qtype: str, n: int, k: int) -> torch.Tensor:
    """The inverse of `to_split`."""
    qk, bpb, off, qb, _ = GGML_SPLIT[qtype]
    nblk = n * (k // qk)
    quant = split[: nblk * qb].reshape(nblk, qb)
    meta = split[nblk * qb :].reshape(nblk, bpb - qb)
    return torch.cat([meta[:, :off], quant, meta[:, off:]], dim=1).reshape(-1)


@dataclass
class _Prepared:
    qbits: torch.Tensor
    meta: torch.Tensor
    group: int
    qk: int
    spb: int
    version: tuple[int, int]
    keep: Any = None  # the split copy, when there is one


_prepared: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, _Prepared]] = {}


def clear_cache() -> None:
    """Forget every split copy (they are re-made on the next call)."""
    _prepared.clear()


def _stat_group(qtype: str, n: int, k: int, block_size: int, scale_mode: str) -> int:
    if qtype == "nf4":
        return block_size
    if scale_mode in ("", "row"):
        return k
    if scale_mode == "tensor":
        return n * k
    return block_size


def _prepare(
    data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int, block_size: int,
    scale_mode: str,
) -> _Prepared:  # fmt: skip
    version = (data._version, stats._version)
    key = (id(data), id(stats))
    hit = _prepared.get(key)
    if hit is not None and hit[0]() is data and hit[1]() is stats and hit[2].version == version:
        return hit[2]
    if qtype in FLAT:
        qk, spb = FLAT[qtype]
        group = _stat_group(qtype, n, k, block_size, scale_mode)
        stats32 = stats.reshape(-1)
        if stats32.dtype != torch.float32 or not stats32.is_contiguous():
            stats32 = stats32.to(torch.float32).contiguous()
        flat = data.reshape(-1).contiguous()
        if flat.data_ptr() % 16:  # the kernels read 16-byte pieces; a view at an odd offset
            flat = flat.clone()
        return _Prepared(flat, stats32, group, qk, spb, version)  # views only: nothing to cache
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"ferroquant: the first CUDA call of a {qtype} weight repacks it (see "
            "ferroquant.cuda_ops); run the layer once before CUDA-graph capture"
        )
    qk, _, _, qb, spb = GGML_SPLIT[qtype]
    split = to_split(data.reshape(-1), qtype, n, k).contiguous()
    nq = n * (k // qk) * qb
    prep = _Prepared(split[:nq], split[nq:], 0, qk, spb, version, keep=split)
    _prepared[key] = (weakref.ref(data), weakref.ref(stats), prep)
    weakref.finalize(data, _prepared.pop, key, None)
    return prep


def supported(x: torch.Tensor, qtype: str, k: int, block_size: int, scale_mode: str) -> bool:
    """True when the CUDA kernels take this call (else ops.py's reference path runs)."""
    if x.dtype not in _ACT or (qtype not in GGML_SPLIT and qtype not in FLAT):
        return False
    if qtype in FLAT:
        if k % 32 or (qtype == "nf4" and (block_size < 32 or block_size & (block_size - 1))):
            return False
        if qtype == "int8" and scale_mode == "block" and (block_size % 16 or k % block_size):
            return False
    return True


def qmatmul_cuda(
    x: torch.Tensor, data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int,
    block_size: int, scale_mode: str, out: torch.Tensor | None = None,
    variant: tuple[str, ...] = (), path: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """y[..., n] = x[..., k] @ W.T on x's CUDA device (x bf16 or fp16). `out`: an optional
    contiguous (rows of x, n) tensor of x's dtype to write into (tests poison it first).
    `variant`: tuning macros of the kernels, `path`: "gemv" (M <= 16), "mma" (M <= 16) or
    "dequant" instead of the default choice (benchmarks and tests)."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    with torch.cuda.device(x.device):
        return _qmatmul_cuda(
            x, data, stats, qtype, n, k, block_size, scale_mode, out, variant, path
        )


def mma_min_m() -> int:
    """The token count from which M <= 16 calls take the tensor-core kernel
    (FERROQUANT_CUDA_MMA_MIN_M; unset or empty: never)."""
    from .. import config

    value = config.cuda_mma_min_m()
    return MAX_GEMV_M + 1 if value is None else value


def choose_path(m: int) -> str:
    if m > MAX_GEMV_M:
        return "dequant"
    return "mma" if m >= mma_min_m() else "gemv"


def mma_split(n: int, k: int, qk: int, spb: int, tiles: int, sms: int) -> tuple[int, int]:
    """(lane steps per K slice, slices) for the mma kernel: enough warps for every SM, each
    slice a multiple of 4 lane steps (a warp's step) and at least 8 of them."""
    steps = (k // qk) * spb
    warps_n = math.ceil(n / (8 * tiles))
    want = max(1, min(math.ceil(sms * MMA_WARPS_PER_SM / warps_n), steps // 8))
    per = math.ceil(math.ceil(steps / want) / 4) * 4
    return per, math.ceil(steps / per)


def _qmatmul_cuda(
    x: torch.Tensor, data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int,
    block_size: int, scale_mode: str, out: torch.Tensor | None, variant: tuple[str, ...],
    path: str | None,
) -> torch.Tensor:  # fmt: skip
    act = _ACT[x.dtype]
    prog = _cuda.program(qtype, x.device, variant)
    prep = _prepare(data, stats, qtype, n, k, block_size, scale_mode)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous() if x2.data_ptr() % 16 == 0 else x2.clone()
    m = x2.shape[0]
    if out is not None and (
        out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous()
        or out.device != x.device or out.data_ptr() % 16
    ):  # fmt: skip
        raise ValueError(f"out must be a contiguous ({m}, {n}) {x.dtype} tensor on {x.device}")
    if m == 0:
        return x.new_empty((*lead, n))
    common = [("ptr", prep.qbits.data_ptr()), ("ptr", prep.meta.data_ptr())]
    path = path or choose_path(m)
    if path != "dequant" and m > MAX_GEMV_M:
        raise ValueError(f"the {path} kernel takes at most {MAX_GEMV_M} tokens, got {m}")
    if path == "mma":
        y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
        per, splits = mma_split(n, k, prep.qk, prep.spb, prog.mma_tiles, prog.sms)
        # one slice writes y directly; more write fp32 partials for the reduction
        ws = torch.empty((splits, m, n) if splits > 1 else (0,), dtype=torch.float32,
                         device=x.device)  # fmt: skip
        warps_n = math.ceil(n / (8 * prog.mma_tiles))
        grid = math.ceil(warps_n / _cuda.MMA_WARPS) * splits
        args = [*common, ("ptr", x2.data_ptr()), ("ptr", y.data_ptr()), ("ptr", ws.data_ptr()),
                ("i32", m), ("i32", n), ("i32", k), ("i64", prep.group), ("i32", per),
                ("i32", splits)]  # fmt: skip
        prog.launch(_cuda.mma_kernel_name(qtype, act), grid, 32 * _cuda.MMA_WARPS, args)
        if splits > 1:
            grid = math.ceil(m * n / _cuda.REDUCE_THREADS)
            args = [("ptr", ws.data_ptr()), ("ptr", y.data_ptr()), ("i64", m * n),
                    ("i32", splits)]  # fmt: skip
            prog.launch(_cuda.reduce_kernel_name(act), grid, _cuda.REDUCE_THREADS, args)
    elif path == "gemv":
        mt = next(t for t in _cuda.GEMV_M if t >= m)
        y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
        warps = math.ceil(n / prog.rows)
        grid = math.ceil(warps / _cuda.GEMV_WARPS)
        args = [*common, ("ptr", x2.data_ptr()), ("ptr", y.data_ptr()), ("i32", m), ("i32", n),
                ("i32", k), ("i64", prep.group)]  # fmt: skip
        prog.launch(_cuda.gemv_kernel_name(qtype, act, mt), grid, 32 * _cuda.GEMV_WARPS, args)
    else:
        w = dequantize_cuda(prog, prep, qtype, act, n, k, x.dtype, x.device)
        if out is None:
            y = torch.nn.functional.linear(x2, w)
        else:
            y = torch.matmul(x2, w.t(), out=out)
    return y.reshape(*lead, n)


def dequantize_cuda(
    prog: Any, prep: _Prepared, qtype: str, act: str, n: int, k: int, dtype: torch.dtype,
    device: torch.device, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    w = torch.empty((n, k), dtype=dtype, device=device) if out is None else out
    threads = n * (k // prep.qk) * prep.spb
    grid = math.ceil(threads / _cuda.DEQUANT_THREADS)
    args = [("ptr", prep.qbits.data_ptr()), ("ptr", prep.meta.data_ptr()), ("ptr", w.data_ptr()),
            ("i32", n), ("i32", k), ("i64", prep.group)]  # fmt: skip
    prog.launch(_cuda.dequant_kernel_name(qtype, act), grid, _cuda.DEQUANT_THREADS, args)
    return w


def dequantize(
    data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int, block_size: int = 0,
    scale_mode: str = "", dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """W (n x k) in `dtype` (bf16/fp16), dequantized on data's CUDA device (bit-exact with
    ferroquant.dequantize rounded to `dtype`). `out`: optional contiguous (n, k) destination."""
    if out is not None and (
        out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous() or out.data_ptr() % 16
    ):
        raise ValueError(f"out must be a contiguous, 16-byte aligned ({n}, {k}) {dtype} tensor")
    with torch.cuda.device(data.device):
        prog = _cuda.program(qtype, data.device)
        prep = _prepare(data, stats, qtype, n, k, block_size, scale_mode)
        return dequantize_cuda(prog, prep, qtype, _ACT[dtype], n, k, dtype, data.device, out)


def register(op: Any, reference: Any) -> None:
    """Register the CUDA kernel of `op` (ops.qmatmul); `reference` handles what it does not."""

    @torch.library.register_kernel(op, "cuda")
    def _(x, data, stats, qtype, n, k, block_size, scale_mode):
        if x.shape[-1] == k and supported(x, qtype, k, block_size, scale_mode):
            return qmatmul_cuda(x, data, stats, qtype, n, k, block_size, scale_mode)
        return reference(x, data, stats, qtype, n, k, block_size, scale_mode)
