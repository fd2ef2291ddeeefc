"""Where our GPTQ's CPU time goes: cProfile (CPU clock) of `quantize_model(..., method="gptq")`
on the default model (SmolLM2-135M), grouped integers int4_g64, calibration on
lee_background.cor, one torch thread; prints the total CPU seconds and the functions that make
up the solve (Cholesky, the compiled column loop, parameter and packing work) and the capture
(x^T x, the layer's Linears, attention).

    python benches/profile_gptq.py [--qtype int4_g64] [--calib-samples 8] [--calib-len 512]
        [--asym-alpha 0] [--true-sequential]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import time

import torch

import ferroquant as fq
from ferroquant.calib import calibration_ids
from ferroquant.eval.load import load_model
from ferroquant.methods import GPTQConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qtype", default="int4_g64")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--asym-alpha", type=float, default=GPTQConfig.asym_alpha,
                    help="GPTAQ's alpha (0: plain GPTQ, the peers' scheme)")  # fmt: skip
    ap.add_argument("--true-sequential", action="store_true",
                    help="true-sequential groups (<= 8 windows: one pass a layer)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    calib = calibration_ids(None, loaded.tokenizer, args.calib_samples, args.calib_len)
    cfg = GPTQConfig(
        n_samples=args.calib_samples,
        seq_len=args.calib_len,
        asym_alpha=args.asym_alpha,
        true_sequential=args.true_sequential,
    )
    model = copy.deepcopy(loaded.model)
    prof = cProfile.Profile(time.process_time)
    c0 = time.process_time()
    prof.enable()
    fq.quantize_model(model, args.qtype, method="gptq", progress=False, calibration=calib,
                      config=cfg)  # fmt: skip
    prof.disable()
    print(f"total CPU s {time.process_time() - c0:.2f} (cProfile's overhead included)")
    parts = {
        "gptq_quantize": "GPTQ solves (all below)",
        "_inverse_cholesky": "  inverse-Hessian factor (one Cholesky, a triangular inverse)",
        "gptq_columns": "  compiled column loop",
        "addmm_": "  later-batch updates (GEMM)",
        "columns": "  block parameters transposed per column",
        "qtensor": "  codes packed into the format's bytes",
        "params": "  block parameters (the format's quantizer)",
        "first_layer_inputs": "capture: the windows up to layer 0 (and each layer's arguments)",
        "gram": "capture: x^T x",
        "linear": "capture: the layers' Linears",
        "scaled_dot_product_attention": "capture: attention",
    }
    found: dict[str, float] = {}
    for (_, _, fn), (_, _, _, cum, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        # Python functions by name; builtins as "<built-in method a.b.NAME>" / "<method 'NAME' ..."
        key = fn.rsplit(".", 1)[-1].rstrip(">") if fn.startswith("<built-in") else fn
        if fn.startswith("<method '"):
            key = fn.split("'")[1]
        if key in parts:
            found[key] = found.get(key, 0.0) + cum
    for fn, what in parts.items():
        print(f"{found.get(fn, 0.0):8.2f} CPU s  {what} ({fn})")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue())


if __name__ == "__main__":
    main()
