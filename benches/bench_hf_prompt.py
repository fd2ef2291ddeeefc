"""Prompt processing in transformers with QuantLinear: `ferroquant eval`'s "hf prompt tok/s" column
(eval/speed.py's `torch_prompt`: one forward over the prompt, batch 1, no cache) for a few rows,
against the bf16 baseline in the same run, plus where a quantized forward's time goes per Linear
shape of the model.

    python benches/bench_hf_prompt.py [--rows bf16,q8_0,q4_0,q4_k_m,nf4,int8] [--threads 2]
                                      [--prompt 128] [--runs 5] [--clock wall|cpu] [--shapes]
                                      [--pool-rows] [--unfused-rows]

The rows are built as the eval builds them (the default model's bf16 baseline, `quantize_model`
with the row's recipe); every run times each row once as the eval does
(`speed.torch_prompt`: an untimed forward, then the timed one), rows interleaved in an order
rotated by one each run (benchlib). The eval and this script differ only in what runs between
two rows (the eval: the native runtime and the decode steps), which the untimed forward is
there to absorb. `--clock cpu` times process CPU time instead of wall time (a loaded machine:
use it with --threads 1).
`--shapes` adds, per row, the time of one QuantLinear call at each Linear shape of the model
with M = prompt rows, against torch's bf16 F.linear at the same shape. `--pool-rows` adds, per
quantized row, "<row> pool": the same model with FERROQUANT_OPENMP=off (the Rust pool instead of
torch's OpenMP team), interleaved with the others: the A/B of the team dispatch in one process.
`--unfused-rows` adds "<row> unfused": the same model with its fused q/k/v and gate/up calls
(nn/fused.py) run member by member, interleaved: the A/B of the fusion in one process.
"""

from __future__ import annotations

import argparse
import os
import time

import benchlib
import torch

from ferroquant import set_num_threads
from ferroquant.eval.load import load_model, read_text, tokenize
from ferroquant.eval.run import parse_rows, quantized_copy
from ferroquant.nn import QuantLinear


def clock(kind: str):
    return time.process_time if kind == "cpu" else time.perf_counter


def forward_s(model, prompt: torch.Tensor, now) -> float:
    """Seconds of the timed forward of eval/speed.py's `torch_prompt` protocol: an untimed
    forward over the prompt, then the timed one. Written out here (not imported) so that the
    script also runs on an older library (the A/B: PYTHONPATH=/work/main/python)."""
    with torch.inference_mode():
        model(input_ids=prompt[None], use_cache=False)
        t0 = now()
        model(input_ids=prompt[None], use_cache=False)
        return now() - t0


def forward_on_pool_s(model, prompt: torch.Tensor, now) -> float:
    """forward_s with FERROQUANT_OPENMP=off: QuantLinear's calls on the Rust pool."""
    old = os.environ.get("FERROQUANT_OPENMP")
    os.environ["FERROQUANT_OPENMP"] = "off"
    try:
        return forward_s(model, prompt, now)
    finally:
        if old is None:
            del os.environ["FERROQUANT_OPENMP"]
        else:
            os.environ["FERROQUANT_OPENMP"] = old


def forward_unfused_s(model, prompt: torch.Tensor, now) -> float:
    """forward_s with each fused QuantLinear called alone (nn/linear.py's `_FUSED` off)."""
    import ferroquant.nn.linear as linear_mod

    linear_mod._FUSED = False
    try:
        return forward_s(model, prompt, now)
    finally:
        linear_mod._FUSED = True


def unfused(lin: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """lin(x) without its fused group (an older library has none)."""
    import ferroquant.nn.linear as linear_mod

    old = getattr(linear_mod, "_FUSED", None)
    linear_mod._FUSED = False
    try:
        return lin(x)
    finally:
        if old is None:
            del linear_mod._FUSED
        else:
            linear_mod._FUSED = old


def shapes_of(model) -> dict[tuple[int, int], QuantLinear]:
    """One QuantLinear per (in, out) shape of `model`."""
    out: dict[tuple[int, int], QuantLinear] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out.setdefault((m.in_features, m.out_features), m)
    return out


def call_s(fn, reps: int, now) -> float:
    with torch.inference_mode():
        fn()
        t0 = now()
        for _ in range(reps):
            fn()
        return (now() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="bf16,q8_0,q4_0,q4_k_m,nf4,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (eval's default 128)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--shapes", action="store_true", help="per-shape QuantLinear call times")
    ap.add_argument("--reps", type=int, default=10, help="calls per --shapes timing")
    ap.add_argument("--pool-rows", action="store_true",
                    help="each quantized row also with FERROQUANT_OPENMP=off")  # fmt: skip
    ap.add_argument("--unfused-rows", action="store_true",
                    help="each quantized row also with its fused calls run alone")  # fmt: skip
    benchlib.add_runs(ap, 5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_num_threads(a.threads)
    now = clock(a.clock)
    print(benchlib.machine())
    print(f"threads {a.threads}, prompt {a.prompt} tokens, {a.clock} clock, runs {a.runs}")

    loaded = load_model(None)
    text, _ = read_text(None)
    prompt = tokenize(loaded.tokenizer, text)[: a.prompt]
    specs = parse_rows(a.rows, None)
    models = {}
    for s in specs:
        t0 = time.perf_counter()
        models[s.name] = quantized_copy(loaded.model, s, progress=False)
        print(f"built {s.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    engines = {n: (lambda m=m: forward_s(m, prompt, now)) for n, m in models.items()}
    if a.pool_rows:
        for n, m in list(models.items())[1:]:
            engines[f"{n} pool"] = lambda m=m: forward_on_pool_s(m, prompt, now)
    if a.unfused_rows:
        for n, m in list(models.items())[1:]:
            engines[f"{n} unfused"] = lambda m=m: forward_unfused_s(m, prompt, now)
    times = benchlib.interleave(engines, a.runs)
    base = specs[0].name
    tps = {n: [a.prompt / t for t in ts] for n, ts in times.items()}
    rows = [
        [n, benchlib.spread(v), f"{benchlib.med(times[n]) * 1e3:.1f}",
         benchlib.ratio(v, tps[base])]
        for n, v in tps.items()
    ]  # fmt: skip
    print(benchlib.table(["row", "hf prompt tok/s", "ms / forward", f"vs {base}"], rows))

    if a.shapes:
        x_rows = a.prompt
        hdr = ["row", "shape (k x n)", "QuantLinear ms", "torch bf16 ms", "ratio"]
        out = []
        for name, m in models.items():
            for (k, n), lin in sorted(shapes_of(m).items()):
                x = torch.randn(x_rows, k, dtype=torch.bfloat16)
                w = torch.randn(n, k, dtype=torch.bfloat16)
                # one member's own call (a fused member would run its whole group)
                ours = call_s(lambda lin=lin, x=x: unfused(lin, x), a.reps, now)
                ref = call_s(lambda x=x, w=w: torch.nn.functional.linear(x, w), a.reps, now)
                out.append([name, f"{k}x{n}", f"{ours * 1e3:.3f}", f"{ref * 1e3:.3f}",
                            f"{ref / ours:.2f}x"])  # fmt: skip
        print(benchlib.table(hdr, out))
    print(f"load average at the end: {benchlib.load()}")


if __name__ == "__main__":
    main()
