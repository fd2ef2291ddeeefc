"""The CUDA kernel of `ferroquant::qmatmul` (registered by ops.py; importing this module touches
no GPU).

Every call is validated first (checks.py: byte and statistics counts for the format and shape,
dtypes, one CUDA device), so no call through the op can make a kernel read out of bounds.

M <= 16 tokens: the fused GEMV kernel (the weight is read once and serves every token), or, from
`FERROQUANT_CUDA_MMA_MIN_M` tokens on (unset: `MMA_MIN_M_DEFAULT`, which the first GPU run sets;
until then never), the tensor-core kernel (weights decoded to bf16/fp16 in registers, mma.sync,
split-K into an fp32 workspace reduced in a fixed order). Larger M: the dequantize kernel writes W
in x's dtype into a workspace from torch's caching allocator, then F.linear (cuBLAS). What the
kernels do not take (formats without kernels, float32 activations, shapes outside their limits,
no NVRTC, a GPU older than sm_80) runs fallback.py on the GPU, warned once per reason.

Weight layouts (see cuda/qmatmul.cu): nf4 and int8 are read as stored, with their float32
statistics (a double-quantized nf4 checkpoint arrives here with its absmax already expanded to
float32, by QuantLinear.from_qtensor). The ggml formats are read in the "split" layout: the same
bytes, the quant bytes of every block first, then every block's remaining bytes (`to_split` /
`from_split`, reversible). QuantLinear repacks its weight into that layout once, when it moves to
a GPU, keeps only that copy, and passes the qtype as "<qtype>+split". A direct op call with the
reference layout gets a split copy made on its first call and kept (weakly keyed by the weight
tensor, re-made when the tensor is modified in place): run it once before capturing it in a CUDA
graph; a first call inside a capture is an error rather than a silent capture of the repack.

The launch path makes no host synchronisation and allocates only through torch; each (weight,
token count, dtype, path) keeps its launch plan (kernel, grid, constant arguments).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .. import _native
from .._native import QuantizeError
from ..qtypes import qtype_info
from . import fallback
from . import nvrtc as _cuda
from .checks import base_qtype, validate, validate_out

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
# The token count from which M = 2..16 takes the tensor-core kernel when FERROQUANT_CUDA_MMA_MIN_M
# is unset; None: never. Set from the first GPU run of benches/gpu_qmatmul.py (pending).
MMA_MIN_M_DEFAULT: int | None = None
MMA_WARPS_PER_SM = 16  # split-K aims for this many mma warps per SM
GEMV_WARPS_PER_SM = 32  # the GEMV splits K across a CTA's warps until this many warps per SM
GEMV_KSPLITS = (1, 2, 4)
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


def reference_layout(data: torch.Tensor, qtype: str, n: int, k: int) -> tuple[torch.Tensor, str]:
    """(data in the reference layout, base qtype) for an op qtype that may name the split one."""
    base, split = base_qtype(qtype)
    return (from_split(data.reshape(-1), base, n, k) if split else data), base


@dataclass
class _Prepared:
    qbits: torch.Tensor
    meta: torch.Tensor
    srs: int  # statistics index = (row * srs + col) >> sshift (see qmatmul.cu)
    sshift: int
    qk: int
    spb: int
    version: tuple[int, int]
    keep: Any = None  # the split copy, when there is one


_prepared: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, _Prepared]] = {}


def clear_cache() -> None:
    """Forget every split copy and launch plan (they are re-made on the next call)."""
    _prepared.clear()
    _plans.clear()


def stat_index(qtype: str, n: int, k: int, block_size: int, scale_mode: str) -> tuple[int, int]:
    """(srs, sshift) with statistic index (row * srs + col) >> sshift, for col < k < 2^31:
    nf4 and int8 blocks (power-of-two sizes): (k, log2 block); int8 per row: (2^31, 31); per
    tensor: (0, 31); ggml formats: (0, 0), unused."""
    if qtype == "nf4" or (qtype == "int8" and scale_mode == "block"):
        return k, block_size.bit_length() - 1
    if qtype == "int8":
        return (0, 31) if scale_mode == "tensor" else (1 << 31, 31)
    return 0, 0


def _prepare(
    data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int, block_size: int,
    scale_mode: str, split: bool = False,
) -> _Prepared:  # fmt: skip
    version = (data._version, stats._version)
    key = (id(data), id(stats))
    hit = _prepared.get(key)
    if hit is not None and hit[0]() is data and hit[1]() is stats and hit[2].version == version:
        return hit[2]
    srs, sshift = stat_index(qtype, n, k, block_size, scale_mode)
    if qtype in FLAT:
        qk, spb = FLAT[qtype]
        stats32 = stats.reshape(-1)
        if stats32.dtype != torch.float32 or not stats32.is_contiguous():
            stats32 = stats32.to(torch.float32).contiguous()
        flat = _aligned(data.reshape(-1))
        return _Prepared(flat, stats32, srs, sshift, qk, spb, version)  # views: nothing to keep
    qk, _, _, qb, spb = GGML_SPLIT[qtype]
    nq = n * (k // qk) * qb
    if split:  # QuantLinear's GPU copy: already the kernels' layout
        flat = _aligned(data.reshape(-1))
        return _Prepared(flat[:nq], flat[nq:], 0, 0, qk, spb, version)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"ferroquant: the first CUDA call of a {qtype} weight repacks it (see "
            "ferroquant.cuda.qmatmul); run the layer once before CUDA-graph capture"
        )
    flat = to_split(data.reshape(-1), qtype, n, k).contiguous()
    prep = _Prepared(flat[:nq], flat[nq:], 0, 0, qk, spb, version, keep=flat)
    _prepared[key] = (weakref.ref(data), weakref.ref(stats), prep)
    weakref.finalize(data, _prepared.pop, key, None)
    return prep


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned (the kernels read 16-byte pieces): a view as it is, else
    a copy."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def refusal(x: torch.Tensor, qtype: str, k: int, block_size: int, scale_mode: str) -> str | None:
    """Why the CUDA kernels cannot take this call (then fallback.py runs), or None."""
    if qtype not in GGML_SPLIT and qtype not in FLAT:
        return f"no CUDA kernel for {qtype}"
    if x.dtype not in _ACT:
        return f"{x.dtype} activations (the kernels take bfloat16 and float16)"
    pow2 = block_size > 0 and block_size & (block_size - 1) == 0
    if qtype in FLAT and k % 32:
        return f"{qtype} with {k} input features (the kernels need a multiple of 32)"
    if qtype == "nf4" and not (pow2 and block_size >= 32):
        return f"nf4 block size {block_size} (the kernels take powers of two from 32)"
    if qtype == "int8" and scale_mode == "block" and not (pow2 and block_size >= 16):
        return f"int8 block size {block_size} (the kernels take powers of two from 16)"
    return None


def supported(x: torch.Tensor, qtype: str, k: int, block_size: int, scale_mode: str) -> bool:
    """True when the CUDA kernels take this call (else fallback.py runs)."""
    return refusal(x, qtype, k, block_size, scale_mode) is None


def qmatmul_cuda(
    x: torch.Tensor, data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int,
    block_size: int, scale_mode: str, out: torch.Tensor | None = None,
    variant: tuple[str, ...] = (), path: str | None = None, ksplit: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """y[..., n] = x[..., k] @ W.T on x's CUDA device (x bf16 or fp16) with the kernels. `qtype`
    may be "<ggml qtype>+split" (data already in the split layout). `out`: an optional
    contiguous (rows of x, n) tensor of x's dtype to write into (tests poison it first).
    `variant`: tuning macros of the kernels; `path`: "gemv" (M <= 16), "mma" (M <= 16) or
    "dequant" instead of the default choice; `ksplit`: warps per row group of the GEMV (1, 2, 4)
    instead of the default (benchmarks and tests)."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if ksplit is not None and ksplit not in GEMV_KSPLITS:
        raise ValueError(f"ksplit must be one of {GEMV_KSPLITS}, got {ksplit!r}")
    validate(x, data, stats, qtype, n, k, block_size, scale_mode)
    base, split = base_qtype(qtype)
    why = refusal(x, base, k, block_size, scale_mode)
    if why is not None:
        raise QuantizeError(f"the CUDA kernels cannot take this call: {why}")
    with torch.cuda.device(x.device):
        return _qmatmul_cuda(x, data, stats, base, split, n, k, block_size, scale_mode, out,
                             variant, path, ksplit)  # fmt: skip


def mma_min_m() -> int:
    """The token count from which M <= 16 calls take the tensor-core kernel
    (FERROQUANT_CUDA_MMA_MIN_M; unset or empty: MMA_MIN_M_DEFAULT; None there: never)."""
    from .. import config

    value = config.cuda_mma_min_m()
    if value is None:
        value = MMA_MIN_M_DEFAULT
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


def gemv_ksplit(n: int, k: int, qk: int, spb: int, rows: int, sms: int) -> int:
    """Warps per row group of the GEMV: the smallest of 1, 2, 4 that gives GEMV_WARPS_PER_SM
    warps per SM, and never more than a row's lane steps fill (32 per warp)."""
    groups = math.ceil(n / rows)
    steps = (k // qk) * spb
    for ks in GEMV_KSPLITS:
        if groups * ks >= GEMV_WARPS_PER_SM * sms or 32 * ks * 2 > steps:
            return ks
    return GEMV_KSPLITS[-1]


# (qtype, m, n, k, act, path, ksplit, program) -> (kernel, grid, per-path constants)
_plans: dict[tuple, tuple[str, int, int, tuple]] = {}
_PLANS_MAX = 4096


def _plan(key: tuple, make: Any) -> tuple:
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        plan = _plans[key] = make()
    return plan


def _qmatmul_cuda(
    x: torch.Tensor, data: torch.Tensor, stats: torch.Tensor, qtype: str, split: bool, n: int,
    k: int, block_size: int, scale_mode: str, out: torch.Tensor | None,
    variant: tuple[str, ...], path: str | None, ksplit: int | None,
) -> torch.Tensor:  # fmt: skip
    act = _ACT[x.dtype]
    prog = _cuda.program(qtype, x.device, variant)
    prep = _prepare(data, stats, qtype, n, k, block_size, scale_mode, split)
    lead = x.shape[:-1]
    x2 = _aligned(x.reshape(-1, k))
    m = x2.shape[0]
    if out is not None:
        validate_out(out, m, n, x.dtype, x.device)
    if m == 0:
        return x.new_empty((*lead, n))
    path = path or choose_path(m)
    if path != "dequant" and m > MAX_GEMV_M:
        raise ValueError(f"the {path} kernel takes at most {MAX_GEMV_M} tokens, got {m}")
    key = (qtype, m, n, k, act, path, ksplit, id(prog))
    if path == "mma":
        y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out

        def make_mma():
            per, splits = mma_split(n, k, prep.qk, prep.spb, prog.mma_tiles, prog.sms)
            warps_n = math.ceil(n / (8 * prog.mma_tiles))
            grid = math.ceil(warps_n / _cuda.MMA_WARPS) * splits
            return (_cuda.mma_kernel_name(qtype, act), grid, per, splits)

        name, grid, per, splits = _plan(key, make_mma)
        # one slice writes y directly; more write fp32 partials for the reduction
        ws = torch.empty((splits, m, n) if splits > 1 else (0,), dtype=torch.float32,
                         device=x.device)  # fmt: skip
        args = [("ptr", prep.qbits.data_ptr()), ("ptr", prep.meta.data_ptr()),
                ("ptr", x2.data_ptr()), ("ptr", y.data_ptr()), ("ptr", ws.data_ptr()),
                ("i32", m), ("i32", n), ("i32", k), ("i64", prep.srs), ("i32", prep.sshift),
                ("i32", per), ("i32", splits)]  # fmt: skip
        prog.launch(name, grid, 32 * _cuda.MMA_WARPS, args)
        if splits > 1:
            grid = math.ceil(m * n / _cuda.REDUCE_THREADS)
            args = [("ptr", ws.data_ptr()), ("ptr", y.data_ptr()), ("i64", m * n),
                    ("i32", splits)]  # fmt: skip
            prog.launch(_cuda.reduce_kernel_name(act), grid, _cuda.REDUCE_THREADS, args)
    elif path == "gemv":
        y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out

        def make_gemv():
            mt = next(t for t in _cuda.GEMV_M if t >= m)
            ks = ksplit or gemv_ksplit(n, k, prep.qk, prep.spb, prog.rows, prog.sms)
            groups = math.ceil(n / prog.rows)
            grid = math.ceil(groups * ks / _cuda.GEMV_WARPS)
            return (_cuda.gemv_kernel_name(qtype, act, mt), grid, ks)

        name, grid, ks = _plan(key, make_gemv)
        args = [("ptr", prep.qbits.data_ptr()), ("ptr", prep.meta.data_ptr()),
                ("ptr", x2.data_ptr()), ("ptr", y.data_ptr()), ("i32", m), ("i32", n),
                ("i32", k), ("i64", prep.srs), ("i32", prep.sshift), ("i32", ks)]  # fmt: skip
        prog.launch(name, grid, 32 * _cuda.GEMV_WARPS, args)
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
            ("i32", n), ("i32", k), ("i64", prep.srs), ("i32", prep.sshift)]  # fmt: skip
    prog.launch(_cuda.dequant_kernel_name(qtype, act), grid, _cuda.DEQUANT_THREADS, args)
    return w


def dequantize(
    data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int, block_size: int = 0,
    scale_mode: str = "", dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """W (n x k) in `dtype` (bf16/fp16), dequantized on data's CUDA device (bit-exact with
    ferroquant.dequantize rounded to `dtype`). `out`: optional contiguous (n, k) destination."""
    probe = torch.empty((1, k), dtype=dtype, device="meta")
    validate(probe, data, stats, qtype, n, k, block_size, scale_mode, device_type="meta")
    base, split = base_qtype(qtype)
    why = refusal(probe, base, k, block_size, scale_mode)
    if why is not None:
        raise QuantizeError(f"the CUDA kernels cannot take this weight: {why}")
    if out is not None:
        validate_out(out, n, k, dtype, data.device)
    with torch.cuda.device(data.device):
        prog = _cuda.program(base, data.device)
        prep = _prepare(data, stats, base, n, k, block_size, scale_mode, split)
        return dequantize_cuda(prog, prep, base, _ACT[dtype], n, k, dtype, data.device, out)


# device index (no NVRTC, an old GPU) or (device index, qtype) (NVRTC rejected that format's
# program) -> why the kernels cannot run there: asked once
_device_refusal: dict[int | tuple[int, str], str] = {}


def cuda_op(
    x: torch.Tensor, data: torch.Tensor, stats: torch.Tensor, qtype: str, n: int, k: int,
    block_size: int, scale_mode: str,
) -> torch.Tensor:  # fmt: skip
    """The op's CUDA kernel: validate, then the kernels, or the GPU fallback (warned once per
    reason) for whatever they cannot take. Raises only for invalid arguments."""
    validate(x, data, stats, qtype, n, k, block_size, scale_mode)
    base, split = base_qtype(qtype)
    why = refusal(x, base, k, block_size, scale_mode)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    why = why or _device_refusal.get(index) or _device_refusal.get((index, base))
    if why is None:
        try:
            with torch.cuda.device(x.device):
                return _qmatmul_cuda(x, data, stats, base, split, n, k, block_size, scale_mode,
                                     None, (), None, None)  # fmt: skip
        except _cuda.CudaUnavailable as e:
            why = _device_refusal[index] = f"the kernels cannot run on cuda:{index}: {e}"
        except _cuda.CudaCompileError as e:
            why = _device_refusal[(index, base)] = f"the {base} kernels did not compile: {e}"
    fallback.warn_once(why)
    ref, base = reference_layout(data, qtype, n, k)
    return fallback.qmatmul(x, ref, stats, base, n, k, block_size, scale_mode)


def register(op: Any) -> None:
    """Register `cuda_op` as the CUDA kernel of `op` (ops.qmatmul)."""
    torch.library.register_kernel(op, "cuda")(cuda_op)
