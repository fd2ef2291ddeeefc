"""Eager-mode overhead of QuantLinear: the direct Rust call (QuantLinear's eager path) against the
torch.library custom op (`torch.ops.ferroquant.qmatmul`, the path torch.compile and CUDA take),
per call on SmolLM2 shapes at M=1, and decode tokens/s of HF `generate` on SmolLM2-135M at q8_0.

    python benches/bench_eager.py [--threads 2] [--tokens 32] [--rounds 5]

Both paths run in one process, interleaved round by round (medians printed), so machine load
hits both alike. "op path" is QuantLinear before the eager path existed (the forward always
called the custom op), reproduced by disabling the eager test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

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


def per_call(k: int, n: int, reps: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), "q8_0")
    x = torch.randn(1, k)
    w, s = q.qweight.numpy(), q.qstats.numpy()
    xn = x.numpy()
    runs = {
        "raw _native.qmatmul": lambda: _native.qmatmul(xn, w, "q8_0", n, k, 32, s, None),
        "QuantLinear eager": lambda: q(x),
        "QuantLinear op path": None,
    }
    out: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in runs.items():
                if fn is None:
                    with op_path():
                        t = _time(lambda: q(x), reps)
                else:
                    t = _time(fn, reps)
                out[name].append(t)
    return {name: statistics.median(v) for name, v in out.items()}


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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall, or this process's CPU time (steadier on a shared machine; "
                    "with --threads 1 --torch-threads 1: tokens per CPU-second)")  # fmt: skip
    ap.add_argument("--skip-generate", action="store_true")
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    fq.set_num_threads(a.threads)
    torch.set_num_threads(a.torch_threads or a.threads)
    print(f"ferroquant threads {a.threads}, torch threads {torch.get_num_threads()}")
    print(f"\nper call, q8_0, M=1 (median of rounds, microseconds, {a.clock} clock)")
    print(f"{'K x N':<12} {'raw Rust':>9} {'eager':>9} {'op path':>9} {'overhead eager':>15} "
          f"{'overhead op':>12}")  # fmt: skip
    for k, n in ((576, 576), (576, 1536), (1536, 576)):
        r = per_call(k, n, a.reps, a.rounds)
        raw, eager, op = (r["raw _native.qmatmul"], r["QuantLinear eager"],
                          r["QuantLinear op path"])  # fmt: skip
        print(f"{f'{k}x{n}':<12} {raw:9.1f} {eager:9.1f} {op:9.1f} {eager - raw:15.1f} "
              f"{op - raw:12.1f}")  # fmt: skip
    if a.skip_generate:
        return
    model = dequantize_model(fq.load_gguf_model(default_model_path()))
    fq.quantize_model(model, "q8_0", progress=False)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    tokens_per_s(model, ids, 4)  # warm-up
    eager, op = [], []
    for _ in range(a.rounds):
        eager.append(tokens_per_s(model, ids, a.tokens))
        with op_path():
            op.append(tokens_per_s(model, ids, a.tokens))
    e, o = statistics.median(eager), statistics.median(op)
    print(f"\nSmolLM2-135M q8_0, HF generate, {a.tokens} new tokens, median of {a.rounds}, "
          f"{a.clock} clock:")  # fmt: skip
    print(f"  op path (before): {o:6.1f} tokens/s")
    print(f"  eager (after):    {e:6.1f} tokens/s   ({e / o:.2f}x)")


if __name__ == "__main__":
    main()
