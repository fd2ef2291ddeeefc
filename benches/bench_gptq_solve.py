"""One SmolLM2-135M layer's four GPTQ solves (q/k/v 960x576, o 576x576, gate/up 3072x576,
down 576x1536), int4_g64, act_order, plain GPTQ: CPU seconds on one torch thread (median of
`--runs`) and a hash of the stored bytes, so that two builds can be A/B'd interleaved:

    for p in /work/main/python $PWD/python /work/main/python $PWD/python; do
        PYTHONPATH=$p python benches/bench_gptq_solve.py; done

Random weights; Hessians 2/n x^T x of 4096 correlated random tokens (fixed seed).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch

from ferroquant.methods import GPTQConfig, gptq_quantize

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qtype", default="int4_g64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    probs = []
    for rows, cols in SHAPES:
        mix = torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols)
        x = torch.randn(4096, cols, generator=g) @ mix
        probs.append((torch.randn(rows, cols, generator=g) * 0.05, (2.0 * x.T @ x / 4096).double()))
    cfg = GPTQConfig(asym_alpha=0)

    def run() -> list:
        return [gptq_quantize(w, h, args.qtype, cfg) for w, h in probs]

    out = run()  # warm-up
    times = []
    for _ in range(args.runs):
        c0 = time.process_time()
        out = run()
        times.append(time.process_time() - c0)
    digest = hashlib.sha1(b"".join(np.asarray(q.data).tobytes() for q, _ in out)).hexdigest()
    print(f"{args.qtype} one layer's solves: CPU s median {sorted(times)[len(times) // 2]:.3f} "
          f"(runs {' '.join(f'{t:.3f}' for t in times)}), bytes sha1 {digest[:12]}")  # fmt: skip


if __name__ == "__main__":
    main()
