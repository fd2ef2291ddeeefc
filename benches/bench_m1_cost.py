"""M = 1 quantized matmul split into its two costs, one thread, the calling thread's CPU time,
weights hot in cache: the fixed cost of a call (checks, the activations quantized and laid out
for the kernel: paid once per call while the pool's other threads wait) and the kernel's rate
over weight rows (GB/s of weight bytes). A kernel whose hot rate is below the share of the read
bandwidth one thread must carry at M = 1 is compute bound there; no prefetch can help it.

    python benches/bench_m1_cost.py --qtypes q4_1,q5_1,q2_k --k 4096,14336 --runs 3

Each measurement times `qmatmul` with N = 8 and N = 72 rows (both cache resident; the slab is
`fq.quantize` of random normal rows, int8 / fp8 with per-row scales): per row = (t72 - t8) / 64,
fixed = t8 - 8 · per row; the median of --reps calls each, the median (min-max) over --runs runs
with the formats interleaved. CPU time counts only this thread's own work, so the numbers hold
up on a machine shared with other jobs better than wall-clock ones (caches and a sibling
hyperthread are still shared): an L2 read probe (`_native.stream_read` over 1 MiB) is printed
for scale. Compare builds by running the same command with another PYTHONPATH.
"""

from __future__ import annotations

import argparse
import time

import benchlib
import numpy as np

import ferroquant as fq
from ferroquant import _native

CLOCK = time.thread_time


def med_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return float(np.median(ts))


def l2_probe() -> float:
    a = np.ones(1 << 20, dtype=np.uint8)
    return a.nbytes / med_time(lambda: _native.stream_read(a), 200) / 1e9


def costs(qtype: str, k: int, reps: int, rng: np.random.Generator) -> tuple[float, float]:
    """(hot GB/s over weight rows, fixed seconds per call) of `qtype` at K = k."""
    kw = {"scale_mode": "row"} if qtype in ("int8", "fp8_e4m3", "fp8_e5m2") else {}
    qt = fq.quantize(rng.standard_normal((64, k)).astype(np.float32), qtype, **kw)
    data = qt.data.reshape(64, -1)
    stats = qt.stats.reshape(64, -1) if qt.stats.size else None
    x = rng.standard_normal((1, k)).astype(np.float32)
    t = {}
    for n in (8, 72):
        idx = np.arange(n) % 64
        d = np.ascontiguousarray(data[idx]).reshape(-1)
        s = np.ascontiguousarray(stats[idx]).reshape(-1) if stats is not None else None

        def call(d=d, s=s, n=n):
            return _native.qmatmul(x, d, qtype, n, k, qt.block_size, s, qt.scale_mode)

        t[n] = med_time(call, reps)
    row_bytes = data.shape[1] + (stats.shape[1] * 4 if stats is not None else 0)
    per_row = (t[72] - t[8]) / 64
    return row_bytes / per_row / 1e9, t[8] - 8 * per_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtypes", default="q4_0,q4_1,q5_1,q4_k,q2_k,q3_k,nf4,int8,fp8_e4m3")
    ap.add_argument("--k", default="4096,14336", help="comma-separated K (row lengths)")
    ap.add_argument("--reps", type=int, default=300, help="calls per measurement")
    benchlib.add_runs(ap, 3)
    args = ap.parse_args()
    fq.set_num_threads(1)
    load = benchlib.load()
    qtypes = [q for q in args.qtypes.split(",") if q]
    ks = [int(v) for v in args.k.split(",")]
    rng = np.random.default_rng(0)
    engines = {"l2": l2_probe}
    for k in ks:
        for q in qtypes:
            engines[f"{k} {q}"] = lambda q=q, k=k: costs(q, k, args.reps, rng)
    res = benchlib.interleave(engines, args.runs)
    l2 = res.pop("l2")
    print(f"\nbench_m1_cost: {benchlib.machine()} (at the start: {load})")
    print(
        f"ferroquant {fq.__version__}, kernels {benchlib.ours_isa()}; one thread, CPU time; "
        f"L2 read probe {benchlib.spread(l2)} GB/s; median (min-max) of {args.runs} runs"
    )
    rows = []
    for key, r in res.items():
        k, q = key.split()
        rows.append((k, q, benchlib.spread([v[0] for v in r]),
                     benchlib.spread([v[1] * 1e6 for v in r])))  # fmt: skip
    print(benchlib.table(("K", "qtype", "hot GB/s (rows)", "fixed us / call"), rows))


if __name__ == "__main__":
    main()
