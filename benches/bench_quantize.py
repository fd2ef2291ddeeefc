"""Quantization throughput: ferroquant (all cores and one core) against the peer that defines each
format, on the same matrix in the same run. Prints a table of weights/s and ratios last.

    python benches/bench_quantize.py                 # 4096 x 14336 float32 (ANCHORS.md)
    python benches/bench_quantize.py --rows 512      # a quicker look

Peers: libggml's ggml_quantize_chunk (one thread, from llama-cpp-python), gguf-py's numpy
quantizers, bitsandbytes' CPU quantize_4bit, torch casts for int8/fp8.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ferroquant as fq  # noqa: E402

TARGETS = {
    "q4_k": ("libggml", 5.0),
    "nf4": ("bitsandbytes", 10.0),
    "q8_0": ("gguf-py", 5.0),
    "q4_0": ("gguf-py", 5.0),
}


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peers_for(qtype: str, x: np.ndarray):
    """(peer name, callable) pairs that produce the same format."""
    out = []
    import peers

    if qtype in peers.GGML_TYPE and qtype not in ("f32", "f16", "bf16"):
        if peers._libggml() is not None:
            out.append(("libggml", lambda: peers.ggml_quantize(x, qtype)))
        if qtype in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
            try:
                import gguf.quants as gq

                t = peers.gguf_qtype(qtype)
                out.append(("gguf-py", lambda: gq.quantize(x, t)))
            except ImportError:
                pass
    if qtype in ("nf4", "fp4"):
        try:
            import bitsandbytes.functional as bnbf
            import torch

            xt = torch.from_numpy(x)
            out.append(
                ("bitsandbytes", lambda: bnbf.quantize_4bit(xt, blocksize=64, quant_type=qtype))
            )
        except ImportError:
            pass
    if qtype in ("int8", "fp8_e4m3"):
        try:
            import torch

            xt = torch.from_numpy(x)

            def torch_scaled():
                amax = xt.abs().amax(dim=1, keepdim=True)
                if qtype == "int8":
                    s = amax / 127
                    return torch.round(xt / s).clamp(-127, 127).to(torch.int8)
                return (xt / (amax / 448)).to(torch.float8_e4m3fn)

            out.append(("torch", torch_scaled))
        except ImportError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument(
        "--qtypes",
        default="q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k,"
        "iq4_nl,iq4_xs,nf4,fp4,int8,fp8_e4m3",
    )
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    n = x.size
    all_threads = os.cpu_count() or 1
    rows = []
    for q in args.qtypes.split(","):
        fq.set_num_threads(all_threads)
        t_all = best_time(lambda q=q: fq.quantize(x, q), args.repeat)
        fq.set_num_threads(1)
        t_one = best_time(lambda q=q: fq.quantize(x, q), max(1, args.repeat - 1))
        fq.set_num_threads(all_threads)
        for name, fn in peers_for(q, x) or [("-", None)]:
            t_peer = (
                best_time(fn, 1 if name == "libggml" and "_k" in q else args.repeat) if fn else None
            )
            rows.append((q, t_all, t_one, name, t_peer))
            print(f"  measured {q} vs {name}", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    print(
        f"\nbench_quantize: {args.rows}x{args.cols} float32, {cpu}, "
        f"{all_threads} threads, {datetime.date.today()}"
    )
    head = (
        f"{'qtype':<9} {'ours all Mw/s':>13} {'ours 1t Mw/s':>12} {'peer':<13} {'peer Mw/s':>9} "
        f"{'ratio all':>9} {'ratio 1t':>8} {'target':>7}"
    )
    print(head)
    print("-" * len(head))
    for q, t_all, t_one, name, t_peer in rows:
        peer = f"{n / t_peer / 1e6:9.1f}" if t_peer else f"{'-':>9}"
        r_all = f"{t_peer / t_all:8.2f}x" if t_peer else f"{'-':>9}"
        r_one = f"{t_peer / t_one:7.2f}x" if t_peer else f"{'-':>8}"
        tgt = TARGETS.get(q)
        target = f"{tgt[1]:.0f}x" if tgt and tgt[0] == name else ""
        ours = f"{n / t_all / 1e6:13.1f} {n / t_one / 1e6:12.1f}"
        print(f"{q:<9} {ours} {name:<13} {peer} {r_all} {r_one} {target:>7}")


if __name__ == "__main__":
    main()
