"""M = 1 from memory on two threads: the split of the weight rows between the threads, A/B in one
process, call by call.

    python benches/bench_m1_split.py --qtypes q4_0,int4_g64,fp8_e4m3 --rounds 5

Each format at each shape rotates over copies of its weights (> --rotate-mb, as bench_matmul.py,
so every call reads from memory) and alternates, call by call, between the two splits of
`qmatmul`'s M = 1 tasks: 'runs' (the default: a contiguous run of tasks a thread, in order) and
'1by1' (FERROQUANT_M1_RUNS=0: tasks claimed one by one from a shared counter, so the threads'
tasks interleave). Both run on torch's OpenMP team as QuantLinear does (`--pool`: the rayon
pool). Wall-clock times (two threads: a thread's CPU time would count its partner's wait);
besides the median this prints the 20th percentile (the calls the scheduler left alone, on a
shared machine). GB/s = weight bytes / time; % = of the read probe (`bench_matmul.py`'s).
Every call's result is checked against the first (the same bits either way).
"""

from __future__ import annotations

import argparse
import os
import time

import benchlib
import numpy as np
from bench_matmul import SHAPES, n_copies, read_bandwidth, slab, tile_rows

from ferroquant import _native

SPLITS = {"runs": "1", "1by1": "0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtypes", default="q4_0,q4_k,q8_0,q2_k,nf4,fp8_e4m3,int4_g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rotate-mb", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=5, help="passes over the copies, each split")
    ap.add_argument("--pool", action="store_true", help="the rayon pool, not torch's team")
    args = ap.parse_args()
    load = benchlib.load()
    team = False
    if not args.pool:
        import torch

        from ferroquant.nn.openmp import torch_team

        torch.set_num_threads(args.threads)
        team = torch_team()
    probe = read_bandwidth(args.threads)[0]  # (sets ferroquant's threads)
    rng = np.random.default_rng(0)
    print(f"bench_m1_split: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; "
          f"{args.threads} threads on {'torch team' if team else 'rayon pool'}; load {load}; "
          f"read probe {probe:.1f} GB/s")  # fmt: skip
    print("| K x N | format | split | GB/s p20 | GB/s median | % probe (median) | calls |")
    print("|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        x = rng.standard_normal((1, k)).astype(np.float32)
        for q in args.qtypes.split(","):
            data, stats, block, mode = slab(q, k, rng)
            data = tile_rows(data, n)
            stats = tile_rows(stats, n) if stats is not None else None
            size = data.nbytes + (stats.nbytes if stats is not None else 0)
            copies = [(data.copy(), stats.copy() if stats is not None else None)
                      for _ in range(n_copies(size, args.rotate_mb))]  # fmt: skip
            wall: dict[str, list[float]] = {s: [] for s in SPLITS}
            want = None
            for r in range(args.rounds + 1):
                for c in copies:
                    for split, env in SPLITS.items():
                        os.environ["FERROQUANT_M1_RUNS"] = env
                        t0 = time.perf_counter()
                        y = _native.qmatmul(x, c[0], q, n, k, block, c[1], mode, openmp=team)
                        t1 = time.perf_counter()
                        if want is None:
                            want = y
                        elif not np.array_equal(y, want):
                            raise SystemExit(f"{q} {k}x{n}: the splits' results differ")
                        if r:  # round 0 warms up (page faults, thread start)
                            wall[split].append(t1 - t0)
            os.environ.pop("FERROQUANT_M1_RUNS", None)
            del copies
            for split in SPLITS:
                w = np.array(wall[split])
                med = size / np.median(w) / 1e9
                print(f"| {k}x{n} | {q} | {split} | {size / np.percentile(w, 20) / 1e9:.1f} | "
                      f"{med:.1f} | {100 * med / probe:.0f}% | {len(w)} |", flush=True)  # fmt: skip
    print(f"load at the end: {benchlib.load()}")


if __name__ == "__main__":
    main()
