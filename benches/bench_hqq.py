"""HQQ: ours (methods/hqq.py) vs round-to-nearest vs the `hqq` package, on SmolLM2-135M's Linears.

For each weight (the dequantized Q4_1 weights of the shipped SmolLM2-135M-Instruct GGUF: the
Linears of the decoder blocks --blocks) and each bit width (--bits, group --group-size, axis 1 =
groups along the input dimension, the layout of ferroquant's int*_g* and of GPTQ):

- rtn: `ferroquant.quantize(w, "int{b}_g{g}")` (fp16 scale, integer zero: the stored format);
- hqq pkg: `hqq.core.quantize.Quantizer.quantize(..., optimize=True)` (float zero, float32
  scale: its own storage), and its own RTN (`optimize=False`);
- ours float zero: our solver (`solve_zero`, Rust) decoded with the float zero (what a
  float-zero format would give; not stored by int*_g*);
- ours stored: `hqq_quantize(w, "int{b}_g{g}")` (Rust: solver, then the joint integer-zero /
  fp16-scale search, each group no worse than RTN);
- ours fz: `hqq_quantize(w, "int{b}_g{g}_fz")`: the float-zero format (fp16 scale, fp16 zero,
  like the package's `(q - z) * s`): the solver's zero as stored, decoded by `fq.dequantize`
  (each group no worse than the format's RTN). The package's error is taken with its float32
  scale and zero (it does not round them to fp16 on the CPU), so ours pays the fp16 rounding.

Then (--ggml) the ggml formats with a minimum, RTN (`ferroquant.quantize`, libggml's bytes) vs
`hqq_quantize` on the same tensors (K-quants: only the weights whose rows are whole 256-blocks,
SmolLM2's ffn_down; q4_1 is left out by default: the weights *are* Q4_1, RTN reproduces them).

--bound-groups N: on N groups drawn from each tensor (seeded), the best integer-zero grid the
stored format can hold, by brute force (every zero 0..maxq x 141 fp16 scales from 0.6x to 1.3x
of (max - min) / maxq, nearest codes, squared error), next to our stored groups and the
package's on the same groups: how far the integer zero alone keeps any search from the
package's float zero.

Relative error = ||W - W_r||_F / ||W||_F, summed over all tensors (sqrt of summed squares over
summed squares). Time: per tensor the median of --runs runs, engines interleaved, summed over
tensors; torch and ferroquant's Rust pool both on --threads threads.

    python benches/bench_hqq.py [--blocks 0,15,29] [--bits 4,3] [--runs 3] [--threads 1]
                                [--ggml q5_1,q2_k,q4_k,q5_k] [--bound-groups 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from benchlib import add_runs, interleave, machine, med, table

import ferroquant as fq
import ferroquant.gguf
from ferroquant.defaults import default_model_path
from ferroquant.methods.hqq import HQQConfig, hqq_quantize, solve_zero
from ferroquant.qtypes import qtype_info

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _timed(fn):
    """Wall time and the process's CPU time (all threads): on a shared, loaded machine the CPU
    time is the work each engine does, the wall time also what the others' jobs took from it."""

    def run():
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return (time.perf_counter() - t0, time.process_time() - c0), out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,15,29", help="decoder blocks (comma-separated)")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ggml", default="q5_1,q2_k,q4_k,q5_k", help="ggml formats ('' for none)")
    ap.add_argument("--bound-groups", type=int, default=0, help="groups per tensor (0: off)")
    add_runs(ap, 3)
    args = ap.parse_args()
    from hqq.core.quantize import Quantizer

    torch.set_num_threads(args.threads)
    fq._native.set_num_threads(args.threads)
    print(machine())
    weights = {}
    with fq.gguf.open(default_model_path()) as f:
        for b in args.blocks.split(","):
            for lin in LINEARS:
                name = f"blk.{b}.{lin}.weight"
                weights[name] = np.ascontiguousarray(f.tensors[name].dequantize())
    g = args.group_size
    rows, bound_rows, fz_rows = [], [], []
    for bits in (int(b) for b in args.bits.split(",")):
        qtype = f"int{bits}_g{g}"
        sq = {k: 0.0 for k in ("rtn", "pkg_rtn", "pkg", "float", "ours", "fz", "fz_rtn")}
        secs = {k: 0.0 for k in ("rtn", "pkg", "ours", "fz")}
        cpu = {k: 0.0 for k in ("pkg", "ours", "fz")}
        norm = 0.0
        bound = {k: 0.0 for k in ("grid", "ours", "pkg", "norm")}
        for w in weights.values():
            wt = torch.from_numpy(w)
            norm += float((wt.double() ** 2).sum())

            def pkg(wt=wt, bits=bits, opt=True):
                return Quantizer.quantize(wt, nbits=bits, group_size=g, axis=1, device="cpu",
                                          bitpack=False, optimize=opt)  # fmt: skip

            res = interleave(
                {
                    "rtn": _timed(lambda w=w, qt=qtype: fq.quantize(w, qt)),
                    "pkg": _timed(pkg),
                    "ours": _timed(lambda w=w, qt=qtype: hqq_quantize(w, qt)),
                    "fz": _timed(lambda w=w, qt=qtype: hqq_quantize(w, qt + "_fz")),
                },
                args.runs,
            )
            for k in secs:
                secs[k] += med([t[0] for t, _ in res[k]])
            for k in cpu:
                cpu[k] += med([t[1] for t, _ in res[k]])

            def err(r: np.ndarray, w=w) -> float:
                return float(((w.astype(np.float64) - r.reshape(w.shape)) ** 2).sum())

            sq["rtn"] += err(fq.dequantize(res["rtn"][0][1]))
            sq["ours"] += err(fq.dequantize(res["ours"][0][1]))
            sq["fz"] += err(fq.dequantize(res["fz"][0][1]))
            sq["fz_rtn"] += err(fq.dequantize(fq.quantize(w, qtype + "_fz")))
            wq, meta = res["pkg"][0][1]
            sq["pkg"] += err(((wq.float() - meta["zero"]) * meta["scale"]).numpy())
            wq, meta = pkg(opt=False)
            sq["pkg_rtn"] += err(((wq.float() - meta["zero"]) * meta["scale"]).numpy())
            gw = w.reshape(-1, g)
            s, z = solve_zero(gw, bits, HQQConfig())
            q = np.clip(np.round(gw * s + z), 0, (1 << bits) - 1)
            sq["float"] += err((q - z) / s)
            if args.bound_groups:
                pick = np.random.default_rng(0).choice(len(gw), args.bound_groups, replace=False)
                ours = fq.dequantize(res["ours"][0][1]).reshape(-1, g)[pick]
                wq, meta = res["pkg"][0][1]
                theirs = ((wq.float() - meta["zero"]) * meta["scale"]).numpy().reshape(-1, g)
                x = gw[pick].astype(np.float64)
                bound["grid"] += _int_zero_grid_best(gw[pick], bits)
                bound["ours"] += float(((ours - x) ** 2).sum())
                bound["pkg"] += float(((theirs[pick] - x) ** 2).sum())
                bound["norm"] += float((x**2).sum())
        rel = {k: (v / norm) ** 0.5 for k, v in sq.items()}
        if args.bound_groups:
            b = {k: (bound[k] / bound["norm"]) ** 0.5 for k in ("grid", "ours", "pkg")}
            bound_rows.append([qtype, str(args.bound_groups * len(weights)), f"{b['grid']:.4f}",
                               f"{b['ours']:.4f}", f"{b['pkg']:.4f}"])  # fmt: skip
        rows.append([
            qtype, f"{rel['rtn']:.4f}", f"{rel['ours']:.4f}", f"{rel['float']:.4f}",
            f"{rel['pkg']:.4f}", f"{rel['pkg_rtn']:.4f}",
            f"{secs['rtn'] * 1e3:.0f}", f"{secs['ours'] * 1e3:.0f}", f"{secs['pkg'] * 1e3:.0f}",
            f"{secs['pkg'] / secs['ours']:.2f}x", f"{cpu['pkg'] / cpu['ours']:.2f}x",
        ])  # fmt: skip
        fz_rows.append([
            qtype + "_fz", f"{rel['fz_rtn']:.4f}", f"{rel['fz']:.4f}", f"{rel['pkg']:.4f}",
            f"{rel['fz'] / rel['pkg']:.4f}", f"{secs['fz'] * 1e3:.0f}", f"{secs['pkg'] * 1e3:.0f}",
            f"{secs['pkg'] / secs['fz']:.2f}x", f"{cpu['pkg'] / cpu['fz']:.2f}x",
        ])  # fmt: skip
    print(f"{len(weights)} tensors (blocks {args.blocks}), group {g}, torch threads "
          f"{args.threads}, {args.runs} runs interleaved")  # fmt: skip
    print(table(
        ["qtype", "rel err RTN (stored)", "HQQ ours (stored, int zero)", "HQQ ours (float zero)",
         "hqq pkg (float zero)", "hqq pkg RTN (float zero)", "ms RTN", "ms HQQ ours",
         "ms hqq pkg", "ours vs pkg speed (wall)", "(CPU time)"], rows))  # fmt: skip
    print(table(
        ["qtype", "rel err RTN (stored)", "HQQ ours (stored, fp16 zero)", "hqq pkg (f32 zero)",
         "ours / pkg error", "ms HQQ ours", "ms hqq pkg", "ours vs pkg speed (wall)",
         "(CPU time)"], fz_rows))  # fmt: skip
    if bound_rows:
        print(table(["qtype", "groups", "best integer-zero grid (brute force)", "HQQ ours (stored)",
                     "hqq pkg (float zero)"], bound_rows))  # fmt: skip
    if args.ggml:
        print(table(["qtype", "tensors", "rel err RTN", "rel err HQQ ours", "ms RTN",
                     "ms HQQ ours"], _ggml_rows(weights, args)))  # fmt: skip


def _int_zero_grid_best(x: np.ndarray, bits: int) -> float:
    """The smallest squared error per group over every integer zero and 141 fp16 scales (the
    module docstring's brute force), summed over the groups `x` [n, g]."""
    maxq = (1 << bits) - 1
    span = (x.max(1) - x.min(1)) / maxq
    best = np.full(len(x), np.inf)
    for f in np.linspace(0.6, 1.3, 141):
        s = (span * f).astype(np.float16).astype(np.float32)[:, None]
        s[s <= 0] = 1.0
        for z in range(maxq + 1):
            q = np.clip(np.round(x / s) + z, 0, maxq)
            best = np.minimum(best, (((q - z) * s - x).astype(np.float64) ** 2).sum(1))
    return float(best.sum())


def _ggml_rows(weights: dict[str, np.ndarray], args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for qtype in args.ggml.split(","):
        block = qtype_info(qtype).block_size
        ws = [w for w in weights.values() if w.shape[1] % block == 0]
        sq = {"rtn": 0.0, "ours": 0.0}
        secs = {"rtn": 0.0, "ours": 0.0}
        norm = 0.0
        for w in ws:
            norm += float((w.astype(np.float64) ** 2).sum())
            res = interleave(
                {
                    "rtn": _timed(lambda w=w, qt=qtype: fq.quantize(w, qt)),
                    "ours": _timed(lambda w=w, qt=qtype: hqq_quantize(w, qt)),
                },
                args.runs,
            )
            for k in secs:
                secs[k] += med([t[0] for t, _ in res[k]])
                r = fq.dequantize(res[k][0][1]).reshape(w.shape).astype(np.float64)
                sq[k] += float(((w - r) ** 2).sum())
        rows.append([qtype, str(len(ws)), f"{(sq['rtn'] / norm) ** 0.5:.4f}",
                     f"{(sq['ours'] / norm) ** 0.5:.4f}", f"{secs['rtn'] * 1e3:.0f}",
                     f"{secs['ours'] * 1e3:.0f}"])  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
