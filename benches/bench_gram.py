"""x^T x of bf16 calibration activations (GPTQ's Hessians at o_proj / down_proj): every path of
`_native.gram_bf16` that runs here (AMX tiles, AVX-512 BF16, not the scalar reference) against
torch's float32 product of the same values (full and the capture's upper-triangle blocks), one
thread, CPU seconds, median of `--repeat` calls interleaved; the max deviation from the float64
sum of the same bf16 products.

    python benches/bench_gram.py [--tokens 4096] [--widths 576,1536] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from ferroquant import _native
from ferroquant.calib import capture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--widths", default="576,1536")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _native.set_num_threads(1)
    paths = [p for p in _native.gram_bf16_paths() if p != "scalar"]
    print(f"load {os.getloadavg()[0]:.1f}, paths {paths}, AMX {_native.amx_status()}")
    for d in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, d, generator=torch.Generator().manual_seed(d))
        xb = x.to(torch.bfloat16)
        bits = xb.view(torch.int16).numpy().view(np.uint16)
        xf = xb.float()
        exact = xf.double().T @ xf.double()
        engines = {
            p: (lambda p=p, b=bits: torch.from_numpy(_native.gram_bf16(b, p))) for p in paths
        }
        engines["torch f32 full"] = lambda a=xf: a.T @ a
        engines["torch f32 triangle"] = lambda a=xf: capture.gram(a)
        times: dict[str, list[float]] = {k: [] for k in engines}
        err: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, f in engines.items():
                c0 = time.process_time()
                g = f()
                times[name].append(time.process_time() - c0)
                err[name] = float((g.double() - exact).abs().max())
        base = statistics.median(times["torch f32 triangle"])
        for name, ts in times.items():
            m = statistics.median(ts)
            print(
                f"d {d} n {args.tokens} | {name:20s} | {1e3 * m:7.1f} ms CPU | "
                f"x torch triangle {base / m:5.2f} | max |err| {err[name]:.3g}"
            )


if __name__ == "__main__":
    main()
