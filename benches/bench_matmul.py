"""Quantized CPU matmul y = x · Wᵀ: ferroquant's kernels against torch's float32 and bfloat16
F.linear and against the machine's multi-threaded memory read bandwidth, in one run.

    python benches/bench_matmul.py                 # 4096x14336 and 14336x4096, M 1 8 64 512
    python benches/bench_matmul.py --m 1 --qtypes q4_0,q4_k
    python benches/bench_matmul.py --m 1 --qtypes all      # every qtype with a kernel

K x N = in x out features (ANCHORS.md). Every backend rotates over copies of its weights that
together exceed --rotate-mb (default 640 MB, over twice the 300 MiB last-level cache), so each
call reads its weights from memory, not from cache. Weights: a 512-row slab quantized by
fq.quantize (int8, fp8: per-row scales) and tiled to N rows (the kernels have no data-dependent
branches, so timing does not depend on the values).
Effective GB/s = weight bytes (data + statistics) / time. The read bandwidth is a
multi-threaded streaming read of a 1 GiB buffer (`_native.stream_read`: each thread sums the
8-byte words of its contiguous part, loads only), best of 5; torch's sum over 1 GiB of float32
(the previous reference, which under-reads) is printed beside it. Threads: ferroquant's pool and
torch both use --threads (default: all cores).

The machine this runs on may be shared: numbers measured while other work runs are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ferroquant as fq  # noqa: E402
from ferroquant import _native  # noqa: E402

SHAPES = ((4096, 14336), (14336, 4096))  # (K, N)
QTYPES = ("q4_0", "q5_0", "q8_0", "iq4_nl", "q4_k", "q5_k", "q6_k", "nf4", "int8")
SLAB_ROWS = 512


def slab(qtype: str, k: int, rng: np.random.Generator):
    """(data per row as uint8 (rows, bytes), stats per row (rows, s) or None, block, mode)."""
    w = rng.standard_normal((SLAB_ROWS, k)).astype(np.float32)
    kw = {"scale_mode": "row"} if qtype in ("int8", "fp8_e4m3", "fp8_e5m2") else {}
    qt = fq.quantize(w, qtype, **kw)
    stats = qt.stats.reshape(SLAB_ROWS, -1) if qt.stats.size else None
    return qt.data.reshape(SLAB_ROWS, -1), stats, qt.block_size, qt.scale_mode


def tile_rows(a: np.ndarray, n: int) -> np.ndarray:
    reps = math.ceil(n / a.shape[0])
    return np.ascontiguousarray(np.tile(a, (reps, 1))[:n]).reshape(-1)


def n_copies(nbytes: int, rotate_mb: int) -> int:
    return max(2, math.ceil(rotate_mb * 1e6 / nbytes) + 1)


def time_calls(fn, copies: list, budget_s: float) -> float:
    """Median seconds per call, each call on the next copy (never one used just before)."""
    fn(copies[-1])  # warm-up (page faults, thread start)
    times = []
    start = time.perf_counter()
    i = 0
    while i < len(copies) and (i < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn(copies[i])
        times.append(time.perf_counter() - t0)
        i += 1
    return float(np.median(times))


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """GB/s of a multi-threaded streaming read: `_native.stream_read` sums the 8-byte words of a
    1 GiB buffer (over 30x the 32 MiB L3 here), each thread of ferroquant's pool (`threads` of
    them) one contiguous part, loads only. Best of 5, after one pass that faults the pages in."""
    fq.set_num_threads(threads)
    a = np.ones(nbytes, dtype=np.uint8)
    _native.stream_read(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _native.stream_read(a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def torch_sum_bandwidth(threads: int) -> float:
    """The old reference, kept for comparison: torch's sum over 1 GiB of float32."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    a.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,8,64,512", help="comma-separated batch sizes M")
    ap.add_argument(
        "--qtypes",
        default=",".join(QTYPES),
        help="comma-separated qtypes with a kernel (_native.qmatmul_qtypes()), or 'all'",
    )
    ap.add_argument("--shapes", default="all", help="'all', '4096x14336' or '14336x4096'")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--rotate-mb", type=int, default=640)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    threads = args.threads or os.cpu_count() or 1
    fq.set_num_threads(threads)
    torch.set_num_threads(threads)
    ms = [int(v) for v in args.m.split(",")]
    qtypes = [q for q in args.qtypes.split(",") if q]
    if qtypes == ["all"]:
        qtypes = list(_native.qmatmul_qtypes())
    shapes = [s for s in SHAPES if args.shapes == "all" or args.shapes == f"{s[0]}x{s[1]}"]
    bw = read_bandwidth(threads)
    bw_torch = torch_sum_bandwidth(threads)
    print(
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{threads} threads, simd {_native.simd_level()}, load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; read bandwidth (stream_read, 1 GiB) "
        f"{bw:.1f} GB/s (torch sum of 1 GiB f32: {bw_torch:.1f} GB/s)",
        flush=True,
    )
    rng = np.random.default_rng(0)
    rows = []  # (shape, M, backend, seconds, bytes)
    for k, n in shapes:
        x_by_m = {m: rng.standard_normal((m, k)).astype(np.float32) for m in ms}
        if not args.no_torch:
            w32 = torch.from_numpy(rng.standard_normal((SLAB_ROWS, k)).astype(np.float32))
            w32 = w32.repeat(math.ceil(n / SLAB_ROWS), 1)[:n].contiguous()
            for name, dt in (("torch f32", torch.float32), ("torch bf16", torch.bfloat16)):
                w = w32.to(dt)
                nbytes = w.numel() * w.element_size()
                copies = [w.clone() for _ in range(n_copies(nbytes, args.rotate_mb))]
                for m in ms:
                    xt = torch.from_numpy(x_by_m[m]).to(dt)
                    with torch.inference_mode():
                        t = time_calls(lambda c, xt=xt: F.linear(xt, c), copies, args.budget)
                    rows.append((f"{k}x{n}", m, name, t, nbytes))
                    print(f"{k}x{n} M={m:<4} {name:12s} {t * 1e3:9.3f} ms", flush=True)
                del copies, w
            del w32
        for q in qtypes:
            data, stats, block, mode = slab(q, k, rng)
            data = tile_rows(data, n)
            stats = tile_rows(stats, n) if stats is not None else None
            nbytes = data.nbytes + (stats.nbytes if stats is not None else 0)
            copies = [
                (data.copy(), stats.copy() if stats is not None else None)
                for _ in range(n_copies(nbytes, args.rotate_mb))
            ]
            for m in ms:
                x = x_by_m[m]

                def call(c, x=x, q=q, n=n, k=k, block=block, mode=mode):
                    return _native.qmatmul(x, c[0], q, n, k, block, c[1], mode)

                t = time_calls(call, copies, args.budget)
                rows.append((f"{k}x{n}", m, f"fq {q}", t, nbytes))
                print(f"{k}x{n} M={m:<4} {'fq ' + q:12s} {t * 1e3:9.3f} ms", flush=True)
            del copies, data, stats

    bf16 = {(s, m): t for s, m, b, t, _ in rows if b == "torch bf16"}
    print()
    print(f"read bandwidth: {bw:.1f} GB/s ({threads} threads)")
    hdr = f"{'K x N':11s} {'M':>4s}  {'backend':12s} {'time ms':>9s} {'GB/s':>7s} "
    print(hdr + f"{'vs bf16':>8s} {'% read bw':>9s}")
    for s, m, b, t, nbytes in rows:
        gbs = nbytes / t / 1e9
        ratio = f"{bf16[(s, m)] / t:7.2f}x" if (s, m) in bf16 else "       -"
        print(f"{s:11s} {m:4d}  {b:12s} {t * 1e3:9.3f} {gbs:7.1f} {ratio} {100 * gbs / bw:8.0f}%")


if __name__ == "__main__":
    main()
