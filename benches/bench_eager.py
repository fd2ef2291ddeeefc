"""Eager-mode overhead of QuantLinear: the direct Rust call (QuantLinear's eager path) against the
torch.library custom op (`torch.ops.ferroquant.qmatmul`, the path torch.compile and CUDA take),
per call on SmolLM2 shapes at M=1, and decode tokens/s of HF `generate` on SmolLM2-135M at q8_0.

    python benches/bench_eager.py [--threads 2] [--tokens 32] [--runs 5]

Both paths run in one process, interleaved within each of --runs runs (benchlib; median (min-max)
printed), so machine load hits both alike. "op path" is QuantLinear before the eager path existed
(the forward always called the custom op), reproduced by disabling the eager test.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import benchlib
import torch

import ferroquant as fq
from ferroquant import _native
from ferroquant.eval.load import default_model_path
from ferroquant.models.gguf_model import dequantize_model
from ferroquant.nn import QuantLinear


@contextmanager
def op_path():
    saved = QuantLinear._eager_ok
    QuantLinear._eager_ok = lambda self, x: False  # noqa: ARG005
    try:
        yield
    finally:
        QuantLinear._eager_ok = saved


def per_call(k: int, n: int, reps: int, runs: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), "q8_0")
    x = torch.randn(1, k)
    w, s = q.qweight.numpy(), q.qstats.numpy()
    xn = x.numpy()

    def op_call():
        with op_path():
            return _time(lambda: q(x), reps)

    with torch.no_grad():
        return benchlib.interleave(
            {
                "raw": lambda: _time(
                    lambda: _native.qmatmul(xn, w, "q8_0", n, k, 32, s, None), reps
                ),  # fmt: skip
                "eager": lambda: _time(lambda: q(x), reps),
                "op": op_call,
            },
            runs,
        )


CLOCK = time.perf_counter


def _time(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    t = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - t) / reps * 1e6


def tokens_per_s(model, ids, n_tokens: int) -> float:
    with torch.no_grad():
        t = CLOCK()
        model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        return n_tokens / (CLOCK() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=None, help="default: --threads")
    ap.add_argument("--tokens", type=int, default=32)
    benchlib.add_runs(ap, 5)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall, or this process's CPU time (steadier on a shared machine; "
                    "with --threads 1 --torch-threads 1: tokens per CPU-second)")  # fmt: skip
    ap.add_argument("--skip-generate", action="store_true")
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    load_start = benchlib.load()
    fq.set_num_threads(a.threads)
    torch.set_num_threads(a.torch_threads or a.threads)
    sp = benchlib.spread
    rows = []
    for k, n in ((576, 576), (576, 1536), (1536, 576)):
        r = per_call(k, n, a.reps, a.runs)
        over_e = [e - w for e, w in zip(r["eager"], r["raw"], strict=True)]
        over_o = [o - w for o, w in zip(r["op"], r["raw"], strict=True)]
        rows.append((f"{k}x{n}", sp(r["raw"]), sp(r["eager"]), sp(r["op"]), sp(over_e),
                     sp(over_o)))  # fmt: skip
    gen = None
    if not a.skip_generate:
        model = dequantize_model(fq.load_gguf_model(default_model_path()))
        fq.quantize_model(model, "q8_0", progress=False)
        ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
        tokens_per_s(model, ids, 4)  # warm-up

        def op_gen():
            with op_path():
                return tokens_per_s(model, ids, a.tokens)

        gen = benchlib.interleave(
            {"eager": lambda: tokens_per_s(model, ids, a.tokens), "op": op_gen}, a.runs
        )
    print(f"\nbench_eager: {benchlib.machine()} (at the start: {load_start})")
    print(f"ferroquant {fq.__version__} (kernels {benchlib.ours_isa()}), {a.threads} threads; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.clock} clock; "
          f"median (min-max) of {a.runs} runs, paths interleaved")  # fmt: skip
    print(f"\nper call, q8_0, M=1, microseconds ({a.reps} calls a measurement); overhead: the "
          "path's time minus the raw Rust call's, per run")  # fmt: skip
    head = ("K x N", "raw Rust", "eager", "op path", "overhead eager", "overhead op")
    print(benchlib.table(head, rows))
    if gen is None:
        return
    unit = "tokens/s" if a.clock == "wall" else "tokens/CPU-s"
    print(f"\nSmolLM2-135M q8_0, HF generate, {a.tokens} new tokens, {unit}:")
    print(benchlib.table(("op path (before)", "eager (after)", "eager vs op path"),
                         [(sp(gen["op"]), sp(gen["eager"]),
                           benchlib.ratio(gen["eager"], gen["op"]))]))  # fmt: skip


if __name__ == "__main__":
    main()
