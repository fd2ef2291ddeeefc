"""One attention layer's decode-step cost in transformers: the cache's `update` plus the
attention call, ferroquant's QuantizedCache (through its `ferroquant_kv` attention, as in
`generate`) against transformers' DynamicCache with its sdpa attention, on SmolLM2-135M's
attention shape (3 key/value heads, 9 query heads, head_dim 64, float32), no model weights.

It isolates what a cache can change in a decode step: the rest of the step (the Linears, norms,
RoPE, transformers' Python) is the same for every cache. Multiplied by the model's 30 layers and
set against kv_hf.py's step time it bounds how much faster any cache can make a step (the
`ceiling` column: the step with DynamicCache's layer cost removed entirely).

Each run: a cache holding P random tokens, then --steps decode steps (64: a whole KIVI group, so
one group is quantized inside every run), timed in the thread's CPU time (one torch thread,
one ferroquant thread); engines interleaved, median (min-max) of --runs.

    python benches/kv_layer.py [--prompt 200,2048] [--kv int4,int2,int2:plain] [--runs 15]
        [--step-ms 41.7]

(`int2`: 4 sinks, a 128-token window, rotated; `int2:plain`: without them.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

N_LAYER, N_KV, N_Q, HEAD_DIM = 30, 3, 9, 64  # SmolLM2-135M


def _config() -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=N_Q * HEAD_DIM,
        num_attention_heads=N_Q,
        num_key_value_heads=N_KV,
        head_dim=HEAD_DIM,
        num_hidden_layers=1,
        intermediate_size=4 * N_Q * HEAD_DIM,
        vocab_size=128,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


class _Module(torch.nn.Module):
    """What the attention functions read from the attention module."""

    num_key_value_groups = N_Q // N_KV
    is_causal = True


@torch.no_grad()
def layer_us(engine: str, prompt: int, steps: int, seed: int) -> float:
    """CPU microseconds per decode step of one layer (update + attention)."""
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ferroquant.kv import QuantizedCache
    from ferroquant.kv import attention as kv_attention

    cfg = _config()
    if engine == "dynamic":
        cache, attend = DynamicCache(config=cfg), sdpa_attention_forward
    else:  # KIND:plain: int2 without sinks, window and rotation (sessions 8-11)
        kind, _, mode = engine.partition(":")
        plain = {"kv_sinks": 0, "kv_residual": 0, "kv_rotation": False} if mode == "plain" else {}
        cache, attend = QuantizedCache(cfg, kind, **plain), kv_attention.attention
    g = torch.Generator().manual_seed(seed)
    shape = (1, N_KV, prompt, HEAD_DIM)
    cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), 0)
    qs = torch.randn(steps, 1, N_Q, 1, HEAD_DIM, generator=g)
    ks = torch.randn(steps, 1, N_KV, 1, HEAD_DIM, generator=g)
    vs = torch.randn(steps, 1, N_KV, 1, HEAD_DIM, generator=g)
    module = _Module().eval()
    t0 = time.thread_time()
    for i in range(steps):
        k, v = cache.update(ks[i], vs[i], 0)
        attend(module, qs[i], k, v, None, scaling=HEAD_DIM**-0.5)
    return (time.thread_time() - t0) / steps * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", default="200,2048", help="tokens in the cache before the steps")
    ap.add_argument("--kv", default="int4,int2", help="our cache types")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument(
        "--step-ms",
        default="",
        help="DynamicCache's whole decode step in ms per prompt (kv_hf.py), for the ceiling",
    )
    benchlib.add_runs(ap, 15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import ferroquant as fq

    fq.set_num_threads(1)
    print(f"[kv_layer] {benchlib.machine()}", flush=True)
    engines = ["dynamic", *args.kv.split(",")]
    prompts = [int(p) for p in args.prompt.split(",")]
    step_ms = [float(s) for s in args.step_ms.split(",") if s]
    for pi, p in enumerate(prompts):
        fns = {e: (lambda e=e, p=p: layer_us(e, p, args.steps, seed=p)) for e in engines}
        for f in fns.values():  # warm-up (allocator, registration)
            f()
        res = benchlib.interleave(fns, args.runs)
        base = res["dynamic"]
        med_base = sorted(base)[len(base) // 2]
        body = []
        for e, v in res.items():
            med = sorted(v)[len(v) // 2]
            speed = benchlib.ratio(v, base, higher_is_better=False)
            row = [e, benchlib.spread(v), speed, f"{med * N_LAYER / 1e3:.2f}"]
            if pi < len(step_ms):  # the step with this cache's layers instead of DynamicCache's
                step = step_ms[pi] - (med_base - med) * N_LAYER / 1e3
                row.append(f"{step_ms[pi] / step:.3f}x")
            body.append(row)
        head = ["cache", "us/layer median (min-max)", "speed vs DynamicCache", "ms/step (x30)"]
        if pi < len(step_ms):
            head.append(f"step speed vs DynamicCache (its step {step_ms[pi]} ms)")
        ceiling = ""
        if pi < len(step_ms):  # DynamicCache's layers gone entirely
            best = step_ms[pi] / (step_ms[pi] - med_base * N_LAYER / 1e3)
            ceiling = f"; ceiling for any cache: {best:.3f}x"
        print(
            f"\nDecode step, one layer, prompt {p} (+{args.steps} steps), "
            f"load {benchlib.load()}{ceiling}:\n\n" + benchlib.table(head, body),
            flush=True,
        )
    print(f"\n{benchlib.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
