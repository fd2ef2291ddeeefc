"""Quantization throughput of ferroquant's K-quants against libggml's `ggml_quantize_chunk`
(one thread: libggml's quantize_qN_K has no threading of its own) on one float32 matrix.

    python benches/bench_k_quants_row.py [--rows 4096] [--cols 14336] [--types q4_k,q6_k]

Prints M weights/s for ferroquant on all cores and on 1 core, libggml, and the ratios.
Every ferroquant result is checked byte-for-byte against libggml's before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import ferroquant as fq  # noqa: E402

import peers  # noqa: E402


def best_of(f, reps: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        f()
        best = min(best, clock() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--types", default="q4_k")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--imatrix", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, a.cols), dtype=np.float32)
    w = rng.random(a.cols, dtype=np.float32) + 0.1 if a.imatrix else None
    n = x.size / 1e6
    all_threads = fq.num_threads()
    rows = []
    for t in a.types.split(","):
        ref = peers.ggml_quantize(x, t, w)
        t_ggml = best_of(lambda t=t: peers.ggml_quantize(x, t, w), a.reps)
        c_ggml = best_of(lambda t=t: peers.ggml_quantize(x, t, w), a.reps, time.process_time)
        ours = fq.quantize(x, t, imatrix=w).data.reshape(-1)
        block = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}[t]
        assert np.array_equal(ours, ref), peers.first_difference(ours, ref, block)
        t_all = best_of(lambda t=t: fq.quantize(x, t, imatrix=w), a.reps)
        fq.set_num_threads(1)
        t_one = best_of(lambda t=t: fq.quantize(x, t, imatrix=w), a.reps)
        c_one = best_of(lambda t=t: fq.quantize(x, t, imatrix=w), a.reps, time.process_time)
        fq.set_num_threads(all_threads)
        rows.append((t, n / t_ggml, n / t_one, n / t_all, n / c_ggml, n / c_one))
    print(f"\n{a.rows}x{a.cols} float32, imatrix={a.imatrix}, best of {a.reps}, M weights/s")
    print("(wall clock; 'cpu' columns: per CPU-second of the process, robust to a busy machine)")
    print(
        f"{'type':6} {'libggml':>9} {'fq 1 thr':>9} {'fq ' + str(all_threads) + ' thr':>9}"
        f" {'1thr/ggml':>10} {'all/ggml':>9} {'ggml cpu':>9} {'fq1 cpu':>9} {'cpu ratio':>9}"
    )
    for t, g, one, al, cg, c1 in rows:
        print(
            f"{t:6} {g:9.1f} {one:9.1f} {al:9.1f} {one / g:10.2f} {al / g:9.2f}"
            f" {cg:9.1f} {c1:9.1f} {c1 / cg:9.2f}"
        )


if __name__ == "__main__":
    main()
