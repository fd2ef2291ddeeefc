"""Quantization throughput of ferroquant's K-quants against libggml's `ggml_quantize_chunk`
(one thread: libggml's quantize_qN_K has no threading of its own) on one float32 matrix.

    python benches/bench_k_quants_row.py [--rows 4096] [--cols 14336] [--types q4_k,q6_k] [--runs 3]

Prints M weights/s for ferroquant on all cores and on 1 core, libggml, and the ratios; wall clock,
and per CPU-second of the process (robust to a busy machine). Each value: median (min-max) of
--runs runs, the three interleaved within each run (benchlib). libggml is the AVX-512 build of
scripts/install-bench-peer.sh when installed, else the AVX2 test peer (the output says which).
Every ferroquant result is checked byte-for-byte against libggml's before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import benchlib
import numpy as np

benchlib.use_bench_llama()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import ferroquant as fq  # noqa: E402

import peers  # noqa: E402


def timed(f, threads: int | None = None):
    """A callable returning (wall, process CPU) seconds of one call of `f`."""

    def run() -> tuple[float, float]:
        if threads is not None:
            fq.set_num_threads(threads)
        w, c = time.perf_counter(), time.process_time()
        f()
        return time.perf_counter() - w, time.process_time() - c

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--types", default="q4_k")
    benchlib.add_runs(ap, 3)
    ap.add_argument("--imatrix", action="store_true")
    a = ap.parse_args()
    load_start = benchlib.load()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, a.cols), dtype=np.float32)
    w = rng.random(a.cols, dtype=np.float32) + 0.1 if a.imatrix else None
    n = x.size / 1e6
    all_threads = fq.num_threads()
    rows = []
    for t in a.types.split(","):
        ref = peers.ggml_quantize(x, t, w)
        ours = fq.quantize(x, t, imatrix=w).data.reshape(-1)
        block = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}[t]
        assert np.array_equal(ours, ref), peers.first_difference(ours, ref, block)
        res = benchlib.interleave(
            {
                "ggml": timed(lambda t=t: peers.ggml_quantize(x, t, w)),
                "one": timed(lambda t=t: fq.quantize(x, t, imatrix=w), 1),
                "all": timed(lambda t=t: fq.quantize(x, t, imatrix=w), all_threads),
            },
            a.runs,
        )
        fq.set_num_threads(all_threads)
        wall = {k: [n / r[0] for r in v] for k, v in res.items()}
        cpu = {k: [n / r[1] for r in v] for k, v in res.items()}
        s, r = benchlib.spread, benchlib.ratio
        rows.append((t, s(wall["ggml"]), s(wall["one"]), s(wall["all"]),
                     r(wall["one"], wall["ggml"]), r(wall["all"], wall["ggml"]),
                     s(cpu["ggml"]), s(cpu["one"]), r(cpu["one"], cpu["ggml"])))  # fmt: skip
    print(f"\nbench_k_quants_row: {a.rows}x{a.cols} float32, imatrix={a.imatrix}; "
          f"{benchlib.machine()} (at the start: {load_start})")  # fmt: skip
    print(f"ferroquant {fq.__version__}, kernels {benchlib.ours_isa()}")
    print(benchlib.llama_build())
    print(f"M weights/s, median (min-max) of {a.runs} runs, interleaved; wall clock, and per "
          "CPU-second of the process ('cpu' columns); ratios: ours / libggml")  # fmt: skip
    head = ("type", "libggml", "fq 1 thr", f"fq {all_threads} thr", "1thr/ggml", "all/ggml",
            "ggml cpu", "fq1 cpu", "cpu ratio")  # fmt: skip
    print(benchlib.table(head, rows))


if __name__ == "__main__":
    main()
