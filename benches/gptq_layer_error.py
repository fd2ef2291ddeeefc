"""GPTQ's layer-wise error on the default model's real weights and Hessians, per option.

For the first --layers decoder layers of SmolLM2-135M-Instruct (the float model's activations on
--calib-samples x --calib-len tokens of lee_background.cor, through `ferroquant.calib.run_layers`;
the layers are not swapped for their quantized versions), every Linear group is solved by
`gptq_quantize` with act_order on / off and the block-scale search on / off, and its weighted
error tr((W-Q) H (W-Q)^T) is printed as a fraction of round-to-nearest's; the totals (sums over
the matrices) close the output. Minutes on a quiet 2-core machine: no perplexity, only the
quantity GPTQ minimises.

    python benches/gptq_layer_error.py [--layers 2] [--qtypes q4_0,nf4] [--calib-samples 8]
"""

from __future__ import annotations

import argparse
import os

import torch

import ferroquant as fq
from ferroquant.calib import calibration_ids, run_layers
from ferroquant.eval.load import load_model
from ferroquant.methods import GPTQConfig, gptq_quantize, layer_error


class _Done(Exception):
    """Stops the layer pipeline after the requested layers."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--qtypes", default="q4_0,nf4")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--scale-search", type=int, default=10)
    args = ap.parse_args()
    qtypes = args.qtypes.split(",")
    loaded = load_model(None)
    calib = calibration_ids(None, loaded.tokenizer, args.calib_samples, args.calib_len)
    totals: dict[tuple[str, bool, int], list[float]] = {}

    def process(i: int, where: str, layer: torch.nn.Module, stats: object) -> None:
        for names, h, _ in stats.groups():
            w = torch.cat([stats.linears[n].weight.detach().float() for n in names])
            for q in qtypes:
                rtn = torch.from_numpy(fq.dequantize(fq.quantize(w.numpy(), q)))
                e_rtn = layer_error(w, rtn, h)
                for act in (True, False):
                    for search in (0, args.scale_search):
                        cfg = GPTQConfig(act_order=act, scale_search=search)
                        _, v = gptq_quantize(w, h, q, cfg)
                        e = layer_error(w, v, h)
                        t = totals.setdefault((q, act, search), [0.0, 0.0])
                        t[0] += e
                        t[1] += e_rtn
                        order = "act_order" if act else "natural"
                        print(f"{where} {'+'.join(names)} {q} {order} search={search} "
                              f"{e / e_rtn:.4f}", flush=True)  # fmt: skip
        if i + 1 >= args.layers:
            raise _Done

    try:
        run_layers(loaded.model, calib, process, progress=False)
    except _Done:
        pass
    load = os.getloadavg()
    print(f"\nlayers 0-{args.layers - 1}, {calib.shape[0]} x {calib.shape[1]} calibration tokens, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    print("| format | act_order | search | GPTQ error / RTN error |")
    print("|---|---|---|---|")
    for (q, act, search), (e, e_rtn) in sorted(totals.items()):
        print(f"| {q} | {act} | {search} | {e / e_rtn:.4f} |")


if __name__ == "__main__":
    main()
