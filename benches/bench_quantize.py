"""Quantization throughput: ferroquant (all cores and one core) against the peer that defines each
format, on the same matrix in the same run. Prints a table of weights/s and ratios last.

    python benches/bench_quantize.py                 # 4096 x 14336 float32 (Llama-3-8B ffn)
    python benches/bench_quantize.py --rows 512      # a quicker look
    python benches/bench_quantize.py --runs 5 --qtypes q4_k,nf4

Peers: libggml's ggml_quantize_chunk (one thread, from llama-cpp-python: the AVX-512 build of
scripts/install-bench-peer.sh when installed, else the AVX2 test peer, as the output says),
gguf-py's numpy quantizers, bitsandbytes' CPU quantize_4bit, torch casts for int8/fp8. Each row:
median (min-max) of --runs runs, ours and the peers interleaved within each run (benchlib);
ratios are the peer's median time over ours.
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

TARGETS = {
    "q4_k": ("libggml", 5.0),
    "nf4": ("bitsandbytes", 10.0),
    "q8_0": ("gguf-py", 5.0),
    "q4_0": ("gguf-py", 5.0),
}


def timed(fn, threads: int | None = None):
    """A callable returning the seconds one call of `fn` takes (on `threads` of ours)."""

    def run() -> float:
        if threads is not None:
            fq.set_num_threads(threads)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument(
        "--qtypes",
        default="q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k,"
        "iq4_nl,iq4_xs,nf4,fp4,int8,fp8_e4m3",
    )
    benchlib.add_runs(ap, 3)
    args = ap.parse_args()
    load_start = benchlib.load()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    n = x.size
    all_threads = os.cpu_count() or 1
    rows = []
    for q in args.qtypes.split(","):
        fq.set_num_threads(all_threads)
        fq.quantize(x, q)  # warm-up
        engines = {
            "all": timed(lambda q=q: fq.quantize(x, q), all_threads),
            "1t": timed(lambda q=q: fq.quantize(x, q), 1),
        }
        peer_fns = peers_for(q, x)
        engines.update({name: timed(fn) for name, fn in peer_fns})
        res = benchlib.interleave(engines, args.runs)
        fq.set_num_threads(all_threads)
        rate = {k: [n / t / 1e6 for t in v] for k, v in res.items()}
        ours = (benchlib.spread(rate["all"]), benchlib.spread(rate["1t"]))
        for name, _ in peer_fns or [("-", None)]:
            tgt = TARGETS.get(q)
            target = f"{tgt[1]:.0f}x" if tgt and tgt[0] == name else ""
            if name in rate:
                peer = (benchlib.spread(rate[name]), benchlib.ratio(rate["all"], rate[name]),
                        benchlib.ratio(rate["1t"], rate[name]))  # fmt: skip
            else:
                peer = ("-", "-", "-")
            rows.append((q, *ours, name, *peer, target))
            print(f"  measured {q} vs {name}", file=sys.stderr, flush=True)
    print(f"\nbench_quantize: {args.rows}x{args.cols} float32; {benchlib.machine()} "
          f"(at the start: {load_start})")  # fmt: skip
    print(f"ferroquant {fq.__version__}, kernels {benchlib.ours_isa()}, {all_threads} threads "
          "('all') and 1 ('1t'); libggml one thread (ggml_quantize_chunk)")  # fmt: skip
    print(benchlib.llama_build())
    print(f"M weights/s, median (min-max) of {args.runs} runs, interleaved; ratios: ours / peer")
    head = ("qtype", "ours all Mw/s", "ours 1t Mw/s", "peer", "peer Mw/s", "ratio all",
            "ratio 1t", "target")  # fmt: skip
    print(benchlib.table(head, rows))


if __name__ == "__main__":
    main()
