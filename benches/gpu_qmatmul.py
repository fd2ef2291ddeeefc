"""GPU dequant-matmul: correctness of every ferroquant CUDA kernel, then timings beside the peers,
in one run on one card. Usage (wheel installed, torch with CUDA):

    python benches/gpu_qmatmul.py            # checks, then times; table last; JSON under $OUT
    python benches/gpu_qmatmul.py --dry-run  # no GPU: builds inputs and float64 references on the
                                             # CPU and compiles every kernel to PTX

Needs only what a bare GPU machine has: torch with CUDA, numpy, cuda-python (cuda-core or
cuda-bindings, NVRTC) and the ferroquant wheel; no registry access. bitsandbytes is timed when it
imports (the table says so when it does not); every peer and every timing runs on its own, so one
that fails is reported and the rest still run.

1. Correctness (fails loudly, exit 1, on any mismatch). For every format (nf4, nf4 with double
   quantization expanded at load, int8 per row / per tensor / per block, q4_0, q8_0, q4_k, q5_k,
   q6_k), activation type (bf16, fp16), M in {1, 2, 3, 4, 5, 8, 13, 16, 17, 64, 512} and odd
   shapes, on fresh random data, with the output NaN-poisoned before each launch:
   - the dequantize kernel is bit-exact with ferroquant.dequantize (CPU) rounded to the dtype;
   - y = x @ W.T against float64 (x exactly as given, W = ferroquant.dequantize in float64) within
         |y - ref| <= sum_k |x_k w_k| * ((K/32 + 6) * 2^-24 + e_w + e_red) + u_out * |ref|
     where K/32 + 5 terms bound each fp32 sum (a lane's sequential sum, then 5 shuffle steps),
     e_w = u_act when W is first rounded to the activation dtype (the M > 16 path), e_red = u_act
     when cuBLAS may reduce in reduced precision (torch's default for bf16/fp16), and
     u_out = 2^-8 (bf16) or 2^-11 (fp16) the rounding of the output; plus 2^-24 for fp16's
     subnormals. Through every available launch backend (cuda.core and cuda.bindings). M <= 16
     runs both the GEMV and the tensor-core (mma) kernel; the mma kernel rounds W to the
     activation dtype and sums in an unspecified order, so it takes the M > 16 path's bound.
   - the op `ferroquant::qmatmul` through QuantLinear on CUDA, eager, torch.compile and a CUDA
     graph capture, gives the same bits as the direct call; the module holds its format's bytes
     once (the split layout replaced the reference bytes); the fallback (float32 activations, a
     format without kernels) computes on the GPU within the cuBLAS bound.
2. Timing: ferroquant (M <= 16: fused GEMV, and for M in {2, 4, 8, 16} also the tensor-core kernel
   as "<format> mma" rows: the default switches to it from FERROQUANT_CUDA_MMA_MIN_M tokens, unset
   until a run shows where it wins; M > 16: dequantize + cuBLAS), bf16 F.linear (cuBLAS),
   bitsandbytes NF4 matmul_4bit (if importable), torch int4 _weight_int4pack_mm (g128) and fp8
   _scaled_mm (x pre-cast to fp8 and padded to 16 rows, as _scaled_mm needs), at K x N = 4096 x
   4096, 4096 x 14336, 14336 x 4096 and M in {1, 2, 4, 8, 16, 64, 512}. Each time is the median of
   15 replays of a CUDA graph of 64 launches rotating over enough weight copies to exceed 4x L2,
   divided by 64, and eager: the median of 15 timed loops of 64 plain Python calls (the launch
   overhead a PyTorch user without graphs sees). Device-to-device copy bandwidth (bytes read +
   written) measured in the same run.
3. Tuning: the GEMV kernel's variants (FQ_ROWS rows per warp, FQ_UNROLL lane steps fetched
   ahead, and the K split across a CTA's warps) for q4_k, nf4 and q8_0 at M = 1 and 16, which
   must agree bit for bit (none changes a row's order of operations except the K split, which
   is checked against float64 instead), timed the same way.
4. Markdown tables (card, date, versions; tuning; then the main one: shape, M, backend, graph and
   eager time, effective GB/s = weight bytes / time, % of copy bandwidth, ratios), the main one
   last, and the M = 2..16 default it suggests (MMA_MIN_M_DEFAULT in ferroquant/cuda/qmatmul.py:
   the smallest M from which the tensor-core kernel beats the GEMV in most rows); all written to
   $OUT/gpu_qmatmul.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time

import numpy as np

import ferroquant as fq
from ferroquant.cuda import nvrtc as fqcuda
from ferroquant.cuda import qmatmul as cuda_ops

FORMATS = ["nf4", "nf4_dq", "int8_row", "int8_tensor", "int8_block", "q4_0", "q8_0", "q4_k",
           "q5_k", "q6_k"]  # fmt: skip
CHECK_M = [1, 2, 3, 4, 5, 8, 13, 16, 17, 64, 512]
TIME_M = [1, 2, 4, 8, 16, 64, 512]
MMA_TIME_M = [2, 4, 8, 16]  # also timed through the tensor-core kernel ("mma" rows)
TIME_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # K x N
TIME_FORMATS = ["nf4", "q4_k", "q8_0", "int8_row", "q6_k", "q5_k", "q4_0"]
# Kernel variants (qmatmul.cu tuning macros) timed side by side; outputs must be bit-identical
# (neither knob changes any row's order of operations).
TUNE_VARIANTS = [(), ("FQ_ROWS=1",), ("FQ_ROWS=4",), ("FQ_UNROLL=1",), ("FQ_UNROLL=4",),
                 ("FQ_ROWS=1", "FQ_UNROLL=4"), ("FQ_ROWS=4", "FQ_UNROLL=1")]  # fmt: skip
TUNE_KSPLITS = [1, 2, 4]  # the GEMV's warps per row group, timed with the default build
TUNE_FORMATS = ["q4_k", "nf4", "q8_0"]
TUNE_SHAPES = [(14336, 4096), (4096, 14336)]
TUNE_M = [1, 16]
GRAPH_LAUNCHES = 64
REPLAYS = 15


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---- weights ---------------------------------------------------------------------------------


def quantized(fmt: str, n: int, k: int, seed: int):
    """(QTensor for the CPU reference, data, stats, qtype, block_size, scale_mode) of random
    normal weights (n x k) in `fmt`; data/stats as QuantLinear holds them (DQ expanded)."""
    from ferroquant.nn.linear import _expand_double_quant

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
    opts: dict = {}
    qtype = fmt
    if fmt == "nf4":
        opts = {"block_size": 64}
    elif fmt == "nf4_dq":
        qtype, opts = "nf4", {"block_size": 64, "double_quant": True}
    elif fmt.startswith("int8_"):
        qtype, mode = "int8", fmt[5:]
        opts = {"scale_mode": mode}
        if mode == "block":
            opts["block_size"] = 64
    qt = fq.quantize(w, qtype, **opts)
    flat = _expand_double_quant(qt) if qt.state is not None else qt
    data = np.ascontiguousarray(flat.data, dtype=np.uint8).reshape(-1)
    stats = np.ascontiguousarray(flat.stats, dtype=np.float32).reshape(-1)
    return qt, data, stats, qtype, int(qt.block_size), qt.scale_mode or "", flat


def kquant_mins(data: np.ndarray, qtype: str, n: int, k: int) -> np.ndarray | None:
    """q4_k / q5_k: each weight's min (dmin * m of its sub-block, as ggml computes it), for the
    GEMV's tolerance; None for the other formats."""
    if qtype not in ("q4_k", "q5_k"):
        return None
    import torch

    from ferroquant.cuda import fallback

    b = torch.from_numpy(data).reshape(-1, fq.qtype_info(qtype).type_size)
    dmin = fallback._half(b[:, 2:4]).unsqueeze(1)
    _, mn = fallback._k4_scales(b[:, 4:16])
    return (dmin * mn.float()).repeat_interleave(32, dim=1).reshape(n, k).double().numpy()


def check_shapes(fmt: str) -> list[tuple[int, int]]:
    """(n, k): a larger one and odd ones (n odd, not a multiple of the CTA's rows; K a few
    blocks)."""
    kq = 256 if fmt.startswith("q") and fmt.endswith("_k") else 32
    if fmt.startswith("nf4") or fmt == "int8_block":
        kq = 64  # rows of whole blocks (block size 64)
    return [(1001, 1024), (37, 3 * kq), (3, 5 * kq)]


# ---- correctness -----------------------------------------------------------------------------


def tolerance(x64, w64, ref, k, act, via_dequant, mins64=None):
    """The bound on |y - ref|. The GEMV sums, per lane, runs of at most 32 products (FMA chain),
    scales each run once and, for the K-quants, subtracts min * (sum of the run's x): its
    magnitude term uses |a v| + |m| <= |w| + 2 |m| per weight (mins64: the K-quants' m)."""
    import torch

    u_act = 2.0**-8 if act == torch.bfloat16 else 2.0**-11
    w_mag = np.abs(w64)
    if via_dequant:  # W rounded to the dtype; cuBLAS: up to K sequential fp32 adds, and
        # possibly reduced-precision split-K reductions (torch's default for bf16/fp16)
        terms, e_w, e_red = k + 6, u_act, u_act
    else:  # fused GEMV: a run of <= 32 FMAs, K/32 run sums per lane, 5 shuffles, 2 part adds
        terms, e_w, e_red = 32 + k / 32 + 8, 0.0, 0.0
        if mins64 is not None:
            w_mag = w_mag + 2 * np.abs(mins64)
    mag = np.abs(x64) @ w_mag.T
    sub = 2.0**-24 if act == torch.float16 else 0.0
    return mag * (terms * 2.0**-24 + e_w + e_red) + u_act * np.abs(ref) + sub


def run_checks(dev, dry_run: bool) -> dict:
    import torch

    failures, count = [], 0
    backends = _backends()
    broken: dict[str, str] = {}  # backend -> the exception that stopped it
    for fmt in FORMATS:
        try:
            prepared = [quantized(fmt, n, k, seed=100 + si) for si, (n, k) in
                        enumerate(check_shapes(fmt))]  # fmt: skip
        except Exception as e:  # a format this build cannot make: reported, the rest go on
            failures.append(f"{fmt}: cannot quantize the check weights: {type(e).__name__}: {e}")
            continue
        for si, (n, k) in enumerate(check_shapes(fmt)):
            qt, data, stats, qtype, bs, mode, flat = prepared[si]
            w32 = fq.dequantize(flat)  # what the kernels read (nf4_dq: absmax expanded)
            if fmt == "nf4_dq" and not np.array_equal(w32, fq.dequantize(qt)):
                failures.append(f"nf4_dq n={n} k={k}: the fp32 absmax expansion differs from "
                                "ferroquant.dequantize of the double-quantized tensor")  # fmt: skip
            w64 = w32.astype(np.float64)
            mins64 = kquant_mins(data, qtype, n, k)
            rng = np.random.default_rng(7 + si)
            d_data = torch.from_numpy(data)
            d_stats = torch.from_numpy(stats)
            if not dry_run:
                d_data, d_stats = d_data.to(dev), d_stats.to(dev)
            for act in (torch.bfloat16, torch.float16):
                want_w = torch.from_numpy(w32).to(act)
                if not dry_run:
                    for be in [b for b in backends if b not in broken]:
                        _use_backend(be)
                        out = torch.full((n, k), float("nan"), dtype=act, device=dev)
                        try:
                            got = cuda_ops.dequantize(
                                d_data, d_stats, qtype, n, k, bs, mode, act, out
                            )
                            torch.cuda.synchronize()
                        except Exception as e:
                            broken[be] = f"[{be}] dequantize {fmt}: {type(e).__name__}: {e}"
                            continue
                        count += 1
                        if not torch.equal(got.cpu(), want_w):
                            bad = (got.cpu() != want_w).nonzero()[:3].tolist()
                            failures.append(f"dequant {fmt} {act} n={n} k={k} [{be}] at {bad}")
                for m in CHECK_M:
                    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(act)
                    x64 = x.double().numpy()
                    ref = x64 @ w64.T
                    if dry_run:
                        continue
                    # every path that takes this M: gemv and mma up to 16 tokens, else dequant
                    paths = ["gemv", "mma"] if m <= cuda_ops.MAX_GEMV_M else ["dequant"]
                    for be, path in [(b, p) for b in backends if b not in broken for p in paths]:
                        if be in broken:
                            continue
                        _use_backend(be)
                        # the mma kernel rounds W to the activation type, as dequant + cuBLAS
                        tol = tolerance(x64, w64, ref, k, act, via_dequant=path != "gemv",
                                        mins64=mins64)  # fmt: skip
                        out = torch.full((m, n), float("nan"), dtype=act, device=dev)
                        try:
                            y = cuda_ops.qmatmul_cuda(
                                x.to(dev),
                                d_data,
                                d_stats,
                                qtype,
                                n,
                                k,
                                bs,
                                mode,
                                out=out,
                                path=path,
                            )
                            torch.cuda.synchronize()
                        except Exception as e:
                            broken[be] = (f"[{be}] qmatmul {fmt} m={m} {path}: "
                                          f"{type(e).__name__}: {e}")  # fmt: skip
                            continue
                        y64 = y.double().cpu().numpy()
                        count += 1
                        err = np.abs(y64 - ref)
                        if not np.all(err <= tol):  # NaN (an unwritten output) fails too
                            i = np.unravel_index(np.argmax(np.nan_to_num(err / tol, nan=1e30)),
                                                 err.shape)  # fmt: skip
                            failures.append(
                                f"qmatmul {fmt} {str(act)[6:]} m={m} n={n} k={k} {path} [{be}]: "
                                f"at {i} got {y64[i]!r} want {ref[i]!r} tol {tol[i]:.3g}"
                            )
            log(f"checked {fmt} n={n} k={k}" + (" (CPU side only)" if dry_run else ""))
    failures += list(broken.values())
    clean = [b for b in backends if b not in broken and not any(f"[{b}]" in f for f in failures)]
    if not dry_run and clean:
        _use_backend(clean[0])
        try:
            failures += check_op(dev)
        except Exception as e:
            failures.append(f"op check: {type(e).__name__}: {e}")
        count += 1
    return {"checks": count, "failures": failures, "backends": backends, "clean_backends": clean}


def _backends() -> list[str]:
    have = []
    for be in ("core", "bindings"):
        os.environ["FERROQUANT_CUDA_BACKEND"] = be
        try:
            fqcuda._backend_name()
            have.append(be)
        except fqcuda.CudaUnavailable:
            pass
    os.environ.pop("FERROQUANT_CUDA_BACKEND", None)
    return have


def _use_backend(be: str) -> None:
    os.environ["FERROQUANT_CUDA_BACKEND"] = be  # programs are kept per backend


def check_op(dev) -> list[str]:
    """QuantLinear on CUDA through torch.ops.ferroquant.qmatmul: eager, torch.compile and a CUDA
    graph give the direct kernel call's bits (M <= 16; M > 16 goes through cuBLAS, which may
    choose another algorithm on a capture stream: within 2^-6 of the largest output)."""
    import torch

    from ferroquant.nn import QuantLinear

    failures = []
    torch.manual_seed(0)
    for qtype in ("q4_k", "nf4"):
        lin = torch.nn.Linear(512, 384, bias=False)  # the op alone: no bias add to fuse
        q = QuantLinear.from_linear(lin, qtype)
        cpu_bytes = sum(b.numel() * b.element_size() for b in q.buffers())
        q = q.to(dev)
        gpu_bytes = sum(b.numel() * b.element_size() for b in q.buffers())
        if gpu_bytes != cpu_bytes:
            failures.append(f"op {qtype}: the CUDA module holds {gpu_bytes} bytes, not the "
                            f"format's {cpu_bytes}")  # fmt: skip
        op_qtype = qtype + "+split" if q.kernel_layout else qtype
        for m in (1, 64):
            x = torch.randn(m, 512, dtype=torch.bfloat16, device=dev)
            direct = cuda_ops.qmatmul_cuda(x, q.qweight, q.qstats, op_qtype, 384, 512,
                                           q.block_size, q.scale_mode or "")  # fmt: skip
            want = direct
            eager = q(x)
            compiled = torch.compile(q, fullgraph=True)(x) if qtype == "q4_k" else eager
            static_x = x.clone()
            q(static_x)  # warm-up (loads kernels, makes the split copy) before capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_y = q(static_x)
            static_x.copy_(x)
            g.replay()
            torch.cuda.synchronize()
            for name, got in (("eager", eager), ("compile", compiled), ("graph", static_y)):
                if m <= cuda_ops.MAX_GEMV_M:
                    same = torch.equal(got, want)  # our kernel alone: deterministic
                else:  # cuBLAS may pick another algorithm on another stream (graph capture)
                    err = (got.float() - want.float()).abs().max().item()
                    same = err <= 2**-6 * want.float().abs().max().item()
                if not same:
                    failures.append(f"op {qtype} m={m} {name}: differs from the direct call")
    failures += check_fallback(dev)
    return failures


def check_fallback(dev) -> list[str]:
    """What the kernels do not take (float32 activations, q3_k) still computes on the GPU
    through the op (dequantize there + torch matmul), within the cuBLAS bound."""
    import warnings

    import torch

    from ferroquant.nn import QuantLinear

    failures = []
    for qtype, dtype in (("q4_k", torch.float32), ("q3_k", torch.bfloat16),
                         ("nf4", torch.float32)):  # fmt: skip
        lin = torch.nn.Linear(512, 96, bias=False)
        q = QuantLinear.from_linear(lin, qtype)
        w64 = q.dequantized_weight().double().numpy()
        q = q.to(dev)
        for m in (1, 5, 40):
            x = torch.randn(m, 512, device=dev).to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's own warning
                y = q(x)
            x64 = x.double().cpu().numpy()
            ref = x64 @ w64.T
            u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
            tol = (np.abs(x64) @ np.abs(w64).T) * ((512 + 6) * 2.0**-24 + 2 * u) + u * np.abs(ref)
            err = np.abs(y.double().cpu().numpy() - ref)
            if y.device != x.device or not np.all(err <= tol):
                failures.append(f"fallback {qtype} {dtype} m={m}: off by {np.max(err - tol):.3g}")
    return failures


# ---- timing ----------------------------------------------------------------------------------


def graph_time_us(fns) -> float:
    """Median over REPLAYS of one CUDA graph of GRAPH_LAUNCHES calls (fns[i % len(fns)]), per
    call."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()  # warm-up outside the capture (loads kernels, makes split copies)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(GRAPH_LAUNCHES):
            fns[i % len(fns)]()
    g.replay()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / GRAPH_LAUNCHES)
    del g
    return statistics.median(times)


def eager_time_us(fns) -> float:
    """Median over REPLAYS of GRAPH_LAUNCHES plain calls (fns[i % len(fns)]) between two events,
    per call: the GPU time when the Python side keeps up, else the Python cost per call."""
    import torch

    for f in fns:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(GRAPH_LAUNCHES):
            fns[i % len(fns)]()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / GRAPH_LAUNCHES)
    return statistics.median(times)


def copy_bandwidth_gbs(dev) -> float:
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000.0)
    return 2 * n / statistics.median(times) / 1e9


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, math.ceil(4 * l2 / max(nbytes, 1)))


def run_timings(dev, notes: list[str]) -> tuple[list[dict], float]:
    """The main table's rows; `notes` collects what could not run (a peer, a shape)."""
    import torch

    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    bw = copy_bandwidth_gbs(dev)
    log(f"copy bandwidth {bw:.0f} GB/s, L2 {l2 >> 20} MiB")
    rows: list[dict] = []
    for k, n in TIME_SHAPES:
        peers = _peer_weights(dev, n, k, l2, notes)
        ours = {}
        for fmt in TIME_FORMATS:
            _, data, stats, qtype, bs, mode, _ = quantized(fmt, n, k, seed=1)
            nbytes = data.nbytes + stats.nbytes
            d0, s0 = torch.from_numpy(data).to(dev), torch.from_numpy(stats).to(dev)
            if qtype in cuda_ops.GGML_SPLIT:  # as QuantLinear keeps it on a GPU: one split copy
                d0, qtype = cuda_ops.to_split(d0, qtype, n, k).contiguous(), qtype + "+split"
            copies = [(d0.clone(), s0.clone()) for _ in range(copies_for(nbytes, l2))]
            ours[fmt] = (qtype, bs, mode, nbytes, copies)
        for m in TIME_M:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)

            def add(backend, nbytes, fns, x=x, m=m, k=k, n=n):
                row = {"K": k, "N": n, "M": m, "backend": backend, "weight_bytes": nbytes}
                for what, timer in (("time_us", graph_time_us), ("eager_us", eager_time_us)):
                    try:
                        row[what] = timer(fns)
                    except Exception as e:  # a peer that cannot run this shape: the rest go on
                        log(f"  {backend} K={k} N={n} M={m} {what}: {type(e).__name__}: {e}")
                        notes.append(f"{backend} K={k} N={n} M={m} {what}: "
                                     f"{type(e).__name__}: {str(e)[:120]}")  # fmt: skip
                if "time_us" in row:
                    rows.append(row)

            for backend, (nbytes, fns) in peers(x).items():
                add(backend, nbytes, fns)
            op = torch.ops.ferroquant.qmatmul
            for fmt, (qtype, bs, mode, nbytes, copies) in ours.items():
                fns = [functools.partial(op, x, d, s, qtype, n, k, bs, mode) for d, s in copies]
                add(f"ferroquant {fmt}", nbytes, fns)
                if m in MMA_TIME_M:
                    fns = [
                        functools.partial(
                            cuda_ops.qmatmul_cuda, x, d, s, qtype, n, k, bs, mode, path="mma"
                        )  # fmt: skip
                        for d, s in copies
                    ]
                    add(f"ferroquant {fmt} mma", nbytes, fns)
            log(f"timed K={k} N={n} M={m}")
        del ours, peers
        torch.cuda.empty_cache()
    for r in rows:
        r["GB_s"] = r["weight_bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["pct_copy_bw"] = 100.0 * r["GB_s"] / bw
    return rows, bw


def _note(notes: list[str], line: str) -> None:
    log(line)
    if line not in notes:
        notes.append(line)


def _peer_weights(dev, n: int, k: int, l2: int, notes: list[str]):
    """backend -> (weight bytes, [callables]) for an activation x, with rotating weight copies."""
    import torch

    w = (torch.randn(n, k, device=dev) * 0.05).to(torch.bfloat16)
    bf16 = [w.clone() for _ in range(copies_for(w.numel() * 2, l2))]
    made: dict = {"bf16": bf16}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        nb = packed.numel() + state.absmax.numel() * 4
        made["bnb"] = (bnb, [(packed.clone(), state) for _ in range(copies_for(nb, l2))], nb)
    except Exception as e:
        _note(notes, f"bitsandbytes NF4 not timed: {type(e).__name__}: {str(e)[:160]}")
    try:
        g = 128
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
        q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(q8, 8)
        sz = (torch.randn(k // g, n, 2, device=dev) * 0.01).to(torch.bfloat16)
        nb = n * k // 2 + sz.numel() * 2
        made["int4"] = ([(packed.clone(), sz.clone()) for _ in range(copies_for(nb, l2))], nb)
    except Exception as e:
        _note(notes, f"torch int4 not timed: {type(e).__name__}: {str(e)[:160]}")
    try:
        w8 = w.to(torch.float8_e4m3fn)
        made["fp8"] = [w8.clone() for _ in range(copies_for(w8.numel(), l2))]
    except Exception as e:
        _note(notes, f"fp8 not timed: {type(e).__name__}: {str(e)[:160]}")

    def for_x(x):
        F = torch.nn.functional
        out = {"bf16 cuBLAS": (n * k * 2, [lambda c=c: F.linear(x, c) for c in made["bf16"]])}
        if "bnb" in made:
            bnb, cs, nb = made["bnb"]
            out["bnb nf4 b64"] = (
                nb, [lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in cs],
            )  # fmt: skip
        if "int4" in made:
            cs, nb = made["int4"]
            out["torch int4 g128"] = (
                nb, [lambda p=p, s=s: torch._weight_int4pack_mm(x, p, 128, s) for p, s in cs],
            )  # fmt: skip
        if "fp8" in made:
            try:
                mp = max(16, -(-x.shape[0] // 16) * 16)
                xp = torch.zeros(mp, k, device=x.device, dtype=torch.bfloat16)
                xp[: x.shape[0]] = x
                x8 = xp.to(torch.float8_e4m3fn)
                one = torch.ones((), device=x.device)
                out["fp8 e4m3 _scaled_mm"] = (
                    n * k,
                    [lambda c=c: torch._scaled_mm(x8, c.t(), scale_a=one, scale_b=one,
                                                  out_dtype=torch.bfloat16) for c in made["fp8"]],
                )  # fmt: skip
            except Exception as e:
                _note(notes, f"fp8 not timed at M={x.shape[0]}: {type(e).__name__}: {e}")
        return out

    return for_x


def run_tuning(dev, bw: float) -> tuple[list[dict], list[str]]:
    """Time every kernel variant of TUNE_FORMATS (M = 1 and 16); check they agree bit for bit."""
    import torch

    l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20))
    t = time.time()
    fqcuda.precompile(TUNE_FORMATS, dev, TUNE_VARIANTS)
    log(f"tuning variants compiled in {time.time() - t:.1f} s")
    rows, failures = [], []
    for k, n in TUNE_SHAPES:
        for fmt in TUNE_FORMATS:
            _, data, stats, qtype, bs, mode, _ = quantized(fmt, n, k, seed=2)
            nbytes = data.nbytes + stats.nbytes
            d0, s0 = torch.from_numpy(data).to(dev), torch.from_numpy(stats).to(dev)
            copies = [(d0.clone(), s0.clone()) for _ in range(copies_for(nbytes, l2))]
            for m in TUNE_M:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
                first = None
                for v in TUNE_VARIANTS:
                    y = cuda_ops.qmatmul_cuda(x, d0, s0, qtype, n, k, bs, mode, variant=v)
                    if first is None:
                        first = y
                    elif not torch.equal(y, first):
                        failures.append(f"variant {v} of {fmt} K={k} N={n} M={m} differs")
                    fns = [
                        functools.partial(
                            cuda_ops.qmatmul_cuda, x, d, s, qtype, n, k, bs, mode, None, v
                        )
                        for d, s in copies
                    ]
                    us = graph_time_us(fns)
                    gbs = nbytes / (us * 1e-6) / 1e9
                    rows.append({"K": k, "N": n, "M": m, "format": fmt, "variant": " ".join(v)
                                 or "default", "time_us": us, "GB_s": gbs,
                                 "pct_copy_bw": 100 * gbs / bw})  # fmt: skip
                # the K split across a CTA's warps changes the summation order: float64 check
                w64 = fq.dequantize(quantized(fmt, n, k, seed=2)[6]).astype(np.float64)
                x64 = x.double().cpu().numpy()
                ref = x64 @ w64.T
                tol = tolerance(x64, w64, ref, k, torch.bfloat16, False,
                                kquant_mins(data, qtype, n, k))  # fmt: skip
                for ks in TUNE_KSPLITS:
                    y = cuda_ops.qmatmul_cuda(x, d0, s0, qtype, n, k, bs, mode, path="gemv",
                                              ksplit=ks)  # fmt: skip
                    if not np.all(np.abs(y.double().cpu().numpy() - ref) <= tol):
                        failures.append(f"ksplit {ks} of {fmt} K={k} N={n} M={m}: off")
                    fns = [
                        functools.partial(
                            cuda_ops.qmatmul_cuda,
                            x,
                            d,
                            s,
                            qtype,
                            n,
                            k,
                            bs,
                            mode,
                            path="gemv",
                            ksplit=ks,
                        )  # fmt: skip
                        for d, s in copies
                    ]
                    us = graph_time_us(fns)
                    gbs = nbytes / (us * 1e-6) / 1e9
                    rows.append({"K": k, "N": n, "M": m, "format": fmt, "variant": f"ksplit={ks}",
                                 "time_us": us, "GB_s": gbs,
                                 "pct_copy_bw": 100 * gbs / bw})  # fmt: skip
            del copies, d0, s0
            torch.cuda.empty_cache()
    return rows, failures


# ---- report ----------------------------------------------------------------------------------


def table(rows: list[dict], bw: float) -> str:
    """The main table in markdown: graph and eager time per call, bandwidth, ratios."""
    base = {(r["K"], r["N"], r["M"]): r["time_us"] for r in rows if r["backend"] == "bf16 cuBLAS"}
    m1 = {(r["K"], r["N"], r["backend"]): r["time_us"] for r in rows if r["M"] == 1}
    lines = [
        f"copy bandwidth (read + write): {bw:.0f} GB/s; times per call in us (graph: median of "
        f"{REPLAYS} replays of {GRAPH_LAUNCHES} launches; eager: {GRAPH_LAUNCHES} Python calls)",
        "",
        "| K x N | M | backend | graph us | eager us | GB/s | % copy | bf16/t | t/t(M=1) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        key = (r["K"], r["N"], r["M"])
        vs_bf16 = base.get(key, float("nan")) / r["time_us"]
        vs_m1 = r["time_us"] / m1.get((r["K"], r["N"], r["backend"]), float("nan"))
        eager = f"{r['eager_us']:.1f}" if "eager_us" in r else "-"
        lines.append(
            f"| {r['K']}x{r['N']} | {r['M']} | {r['backend']} | {r['time_us']:.1f} | {eager} | "
            f"{r['GB_s']:.0f} | {r['pct_copy_bw']:.1f}% | {vs_bf16:.2f} | {vs_m1:.2f} |"
        )
    return "\n".join(lines)


def tuning_table(rows: list[dict]) -> str:
    lines = ["| K x N | M | format | variant | graph us | % copy |", "|---|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['K']}x{r['N']} | {r['M']} | {r['format']} | {r['variant']} | "
            f"{r['time_us']:.1f} | {r['pct_copy_bw']:.1f}% |"
        )
    return "\n".join(lines)


def suggest_mma_min_m(rows: list[dict]) -> int | None:
    """The smallest M of MMA_TIME_M from which the tensor-core kernel beats the GEMV in most
    (shape, format) rows at that M and every larger timed M; None: never."""
    t = {(r["K"], r["N"], r["M"], r["backend"]): r["time_us"] for r in rows}
    wins = {}
    for m in MMA_TIME_M:
        pairs = [(v, t.get((K, N, M, b[:-4]))) for (K, N, M, b), v in t.items()
                 if M == m and b.endswith(" mma")]  # fmt: skip
        pairs = [(a, b) for a, b in pairs if b is not None]
        wins[m] = bool(pairs) and sum(a < b for a, b in pairs) * 2 > len(pairs)
    for i, m in enumerate(MMA_TIME_M):
        if all(wins[x] for x in MMA_TIME_M[i:]):
            return m
    return None


def header(report: dict) -> str:
    return "\n".join([
        f"card: {report.get('device', '?')}; date: {report['date']}; torch {report.get('torch')}"
        f" (CUDA {report.get('cuda')}); {report.get('diagnose', '')}; ferroquant "
        f"{report['ferroquant']}",
        f"command: python benches/gpu_qmatmul.py {' '.join(sys.argv[1:])}",
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU side only (no GPU needed)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-tuning", action="store_true", help="no kernel-variant timings")
    ap.add_argument("--arch", default="sm_90", help="--dry-run: the PTX target (default sm_90)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    now = datetime.datetime.now(datetime.timezone.utc)
    report: dict = {"ferroquant": fq.__version__, "date": now.strftime("%Y-%m-%d %H:%M UTC")}
    if args.dry_run:
        ptx = fqcuda.compile_all_ptx(args.arch)
        n = sum(len(fqcuda.kernel_names(q)) for q in ptx)
        log(f"compiled {n} kernels to PTX for {args.arch}")
        report["ptx_kernels"] = n
        dev = None
    else:
        import torch

        fqcuda.check_device()  # CudaUnavailable says what is missing
        dev = torch.device("cuda", torch.cuda.current_device())
        report["device"] = torch.cuda.get_device_name(dev)
        report["torch"] = torch.__version__
        report["cuda"] = torch.version.cuda
        t = time.time()
        fqcuda.precompile()
        report["diagnose"] = fqcuda.diagnose()
        log(f"{report['diagnose']}; kernels ready in {time.time() - t:.1f} s")
    checks = run_checks(dev, args.dry_run)
    report["correctness"] = checks
    failures = checks["failures"]
    log(f"correctness: {checks['checks']} checks, {len(failures)} failures "
        f"({time.time() - t0:.0f} s)")  # fmt: skip
    if args.dry_run or args.skip_timing or not checks["clean_backends"]:
        _write(report)
        return _verdict(failures)
    # Timings still run when one launch backend passed every check (its numbers are meaningful);
    # the failures are printed after the table and the exit status is 1.
    _use_backend(checks["clean_backends"][0])
    notes: list[str] = []
    rows, bw = run_timings(dev, notes)
    report.update(rows=rows, copy_bandwidth_GB_s=bw, notes=notes)
    report["suggested_mma_min_m"] = suggest_mma_min_m(rows)
    tune: list[dict] = []
    if not args.skip_tuning:
        try:
            tune, tune_failures = run_tuning(dev, bw)
            failures += tune_failures
        except Exception as e:  # the main table still counts
            failures.append(f"tuning: {type(e).__name__}: {e}")
        report["tuning"] = tune
    report["seconds"] = time.time() - t0
    _write(report)
    print(header(report))
    print()
    if tune:
        print(tuning_table(tune))
        print()
    print(table(rows, bw))
    print()
    print(f"suggested MMA_MIN_M_DEFAULT (ferroquant/cuda/qmatmul.py): "
          f"{report['suggested_mma_min_m']}")  # fmt: skip
    for line in notes:
        print(f"note: {line}")
    return _verdict(failures)


def _verdict(failures: list[str]) -> int:
    if failures:
        print("\n".join(["CORRECTNESS FAILURES:", *failures[:50]]))
        return 1
    return 0


def _write(report: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_qmatmul.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
