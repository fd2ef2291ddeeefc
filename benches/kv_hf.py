"""ferroquant.kv.QuantizedCache inside transformers, on SmolLM2-135M-Instruct (the shipped GGUF):
quality and decode speed per cache type, against transformers' DynamicCache (the default, f32
here) and transformers' own QuantizedCache with the optimum-quanto backend (4-bit, q_group_size
64, residual 128: its defaults), in one run.

Models: the GGUF's weights dequantized to float32 ("float"), and QuantLinear copies of that model
(`quantize_model(copy, "q8_0")`, `"q4_k_m"`): the weights the KV types are compared on.

Perplexity: held-out lee.cor, the first window of `ctx` tokens (one window per ctx in --quick,
else consecutive windows, stride ctx, while lee.cor lasts), fed to every engine in chunks of
--ppl-chunk (32) tokens (the first 31, so that every chunk starts on the token whose append
quantizes a group), so that each token attends to the earlier ones exactly as the cache holds
them during a token-by-token stream (ours: int4 / int2 return the current chunk in full
precision, as their residual would hold it, and the groups quantized when the chunk's first
token was appended; quanto keeps its own 128-token full-precision residual). `int2` is the
shipped int2 (4 sinks, a 128-token window, rotated); `int2:plain` the same format without
them (the int2 of sessions 8-11).
Reported against our f16 cache on the same weights (the issue's baseline), with the f32
DynamicCache beside it.

Decode speed: a real prefill (the model runs the whole prompt of P tokens, lee.cor, then
lee_background.cor where P is longer, into the cache), then greedy decoding of `--new-tokens`
tokens; the time of the decode steps only (model forward + cache), tokens/s; engines
interleaved, medians (min-max) of --runs. Our engines decode with the `ferroquant_kv` attention
(quantized rows read in place); `KIND:dequant` (e.g. `int4:dequant`) is the same cache with
`fast_decode=False` (every step dequantizes the layer: the old path). `--quanto-speed int4,int2`
times transformers' quanto caches at those widths. `--clock cpu` (with `--threads 1`) times the
decode steps in the thread's CPU time: on a machine shared by many jobs the wall time mostly
measures the wait for a core.
The machine is shared: the load average is printed with each run.

    python benches/kv_hf.py [--quick] [--runs 3] [--ctx 2048,4096] [--decode-prompt 200,2048]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

OURS = ["f16", "q8_0", "fp8_e4m3", "q4_0", "int4", "int2"]
_PPL_CHUNK = 32
TARGETS = {"q8_0": 0.1, "fp8_e4m3": 0.1, "int4": 1.0, "int2": 5.0}  # % over f16


def _load(weights: list[str]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """(models by weights name, lee.cor + lee_background.cor token ids, lee.cor's ids)."""
    from transformers import AutoTokenizer

    import ferroquant as fq
    from ferroquant.defaults import (
        CALIBRATION_TEXT,
        default_model_path,
        default_text_path,
        gensim_text_path,
    )
    from ferroquant.models.gguf_model import dequantize_model, load_gguf_model

    path = default_model_path()
    base = dequantize_model(load_gguf_model(path))
    models = {}
    for w in weights:
        models[w] = base if w == "float" else fq.quantize_model(copy.deepcopy(base), w)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = default_text_path().read_text(encoding="latin-1")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    # decode prompts longer than lee.cor continue with lee_background.cor
    more = gensim_text_path(CALIBRATION_TEXT).read_text(encoding="latin-1")
    more_ids = torch.tensor(tok(more, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    return models, torch.cat([ids, more_ids]), ids


def _cache(model: Any, engine: str) -> Any:
    from transformers import DynamicCache
    from transformers import QuantizedCache as HFQuantizedCache

    from ferroquant.kv import QuantizedCache

    if engine in ("dynamic", "quanto-int4", "quanto-int2"):
        # transformers' own attention for its caches (ours switches the config to
        # ferroquant_kv, which would add a Python call per layer to theirs)
        if model.config._attn_implementation == "ferroquant_kv":
            model.config._attn_implementation = "sdpa"
        if engine == "dynamic":
            return DynamicCache(config=model.config)
        return HFQuantizedCache("quanto", model.config, nbits=int(engine[-1]))
    kind, _, mode = engine.partition(":")
    if mode not in ("", "dequant", "plain"):
        raise ValueError(f"engine {engine!r}: expected KIND, KIND:dequant or KIND:plain")
    # KIND:dequant: every step dequantizes the layer (the pre-ferroquant_kv path);
    # KIND:plain: no sinks, no full-precision window, no rotation (int2 before session 12)
    plain = {"kv_sinks": 0, "kv_residual": 0, "kv_rotation": False} if mode == "plain" else {}
    return QuantizedCache(model.config, kind, fast_decode=mode != "dequant", **plain)


@torch.no_grad()
def _nll(model: Any, window: torch.Tensor, engine: str) -> tuple[float, int]:
    cache = _cache(model, engine)
    chunk = _PPL_CHUNK
    logits = []
    # chunks start at 0, chunk - 1, 2 chunk - 1, ...: a KIVI group is quantized when a token
    # at a multiple of 32 minus one is appended (groups of 64, windows of 0 / 128 tokens), so
    # each chunk starts on such a token and no quantization happens inside a chunk
    starts = [0, *range(chunk - 1, window.numel(), chunk)]
    for at, end in zip(starts, [*starts[1:], window.numel()], strict=True):
        part = window[at:end].unsqueeze(0)
        logits.append(model(part, past_key_values=cache, use_cache=True).logits[0].float())
    lg = torch.cat(logits)[:-1]
    nll = torch.nn.functional.cross_entropy(lg, window[1:], reduction="sum")
    return float(nll), window.numel() - 1


def perplexity_rows(
    models: dict[str, Any], ids: torch.Tensor, ctxs: list[int], engines: list[str], quick: bool
) -> list[dict]:
    rows = []
    for ctx in ctxs:
        n_win = 1 if quick else max(1, ids.numel() // ctx)
        windows = [ids[i * ctx : (i + 1) * ctx] for i in range(n_win)]
        if windows[0].numel() < ctx:
            print(f"[kv_hf] lee.cor has {ids.numel()} tokens: ctx {ctx} skipped", flush=True)
            continue
        for w, model in models.items():
            for engine in engines:
                t0 = time.perf_counter()
                tot, cnt = 0.0, 0
                for win in windows:
                    a, b = _nll(model, win, engine)
                    tot, cnt = tot + a, cnt + b
                ppl = math.exp(tot / cnt)
                rows.append(
                    {
                        "kind": "ppl",
                        "weights": w,
                        "ctx": ctx,
                        "engine": engine,
                        "windows": n_win,
                        "ppl": ppl,
                    }
                )
                print(
                    f"[kv_hf] ppl {w} ctx {ctx} {engine}: {ppl:.4f} "
                    f"({time.perf_counter() - t0:.0f} s, load {benchlib.load()})",
                    flush=True,
                )
    return rows


# the decode timer: wall time, or with --clock cpu this thread's CPU time (every engine runs on
# the calling thread at --threads 1), which leaves out the time a loaded machine keeps it waiting
_CLOCK = time.perf_counter


@torch.no_grad()
def _decode_tps(model: Any, prompt: torch.Tensor, engine: str, new_tokens: int) -> float:
    cache = _cache(model, engine)
    out = model(prompt.unsqueeze(0), past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = _CLOCK()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    return new_tokens / (_CLOCK() - t0)


def speed_rows(
    models: dict[str, Any],
    ids: torch.Tensor,
    prompts: list[int],
    engines: list[str],
    new_tokens: int,
    runs: int,
) -> list[dict]:
    rows = []
    for w, model in models.items():
        for p in prompts:
            prompt = ids[:p]
            fns = {
                e: (lambda e=e, m=model, q=prompt: _decode_tps(m, q, e, new_tokens))
                for e in engines
            }
            fns[engines[0]]()  # warm-up (allocator, threads)
            res = benchlib.interleave(fns, runs)
            for e, tps in res.items():
                rows.append(  # tok_s: one value per run
                    {
                        "kind": "decode",
                        "weights": w,
                        "prompt": p,
                        "engine": e,
                        "new_tokens": new_tokens,
                        "tok_s": tps,
                        "load": benchlib.load(),
                    }
                )
            print(
                f"[kv_hf] decode {w} prompt {p}: "
                + ", ".join(f"{e} {benchlib.spread(v)}" for e, v in res.items())
                + f" (load {benchlib.load()})",
                flush=True,
            )
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """The benchmark's rows (dicts with kind "ppl" or "decode"); bench_kv.py may call this."""
    global _PPL_CHUNK, _CLOCK
    _PPL_CHUNK = args.ppl_chunk
    if args.clock == "cpu":
        if args.threads != 1:
            raise SystemExit("--clock cpu needs --threads 1 (the decode runs on one thread)")
        _CLOCK = time.thread_time
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.threads:  # our attention kernel runs on ferroquant's pool: the same thread count
        import ferroquant as fq

        fq.set_num_threads(args.threads)
    models, long_ids, ids = _load(args.weights.split(","))
    ours = args.kv.split(",")
    rows = []
    if not args.no_ppl:
        engines = (["dynamic"] if getattr(args, "ppl_dynamic", True) else []) + ours
        engines += ["quanto-int4"] if args.quanto else []
        rows += perplexity_rows(
            models, ids, [int(c) for c in args.ctx.split(",")], engines, args.quick
        )
    if getattr(args, "no_speed", False):
        return rows
    speed_models = {w: m for w, m in models.items() if w in args.speed_weights.split(",")}
    engines = ["dynamic", *args.speed_kv.split(",")]
    engines += [f"quanto-{k}" for k in args.quanto_speed.split(",") if k] if args.quanto else []
    rows += speed_rows(
        speed_models,
        long_ids,
        [int(p) for p in args.decode_prompt.split(",")],
        engines,
        args.new_tokens,
        args.runs,
    )
    return rows


def report(rows: list[dict]) -> str:
    out = []
    ppl = [r for r in rows if r["kind"] == "ppl"]
    for w, ctx in dict.fromkeys((r["weights"], r["ctx"]) for r in ppl):
        sel = {r["engine"]: r for r in ppl if r["weights"] == w and r["ctx"] == ctx}
        f16 = sel.get("f16", {}).get("ppl")
        body = []
        for e, r in sel.items():
            d = f"{100 * (r['ppl'] / f16 - 1):+.3f} %" if f16 else "-"
            kind = e.split("-")[-1]
            target = f"<= +{TARGETS[kind]} %" if kind in TARGETS and e in OURS else ""
            body.append([e, f"{r['ppl']:.4f}", d, target, r["windows"]])
        out.append(
            f"Perplexity, weights {w}, ctx {ctx} (lee.cor):\n\n"
            + benchlib.table(["cache", "ppl", "vs f16 cache", "target", "windows"], body)
        )
    dec = [r for r in rows if r["kind"] == "decode"]
    for w, p in dict.fromkeys((r["weights"], r["prompt"]) for r in dec):
        sel: dict[str, list[float]] = {}
        for r in dec:
            if r["weights"] == w and r["prompt"] == p:
                sel.setdefault(r["engine"], []).extend(r["tok_s"])
        base = sel["dynamic"]
        body = [[e, benchlib.spread(v), benchlib.ratio(v, base)] for e, v in sel.items()]
        out.append(
            f"Decode tokens/s, weights {w}, prompt {p} tokens:\n\n"
            + benchlib.table(["cache", "tok/s median (min-max)", "vs DynamicCache"], body)
        )
    return "\n\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one ppl window per ctx, float and q8_0 weights, speed on float only",
    )
    benchlib.add_runs(ap, 3)
    ap.add_argument("--ctx", default="2048,4096")
    ap.add_argument("--weights", default="float,q8_0,q4_k_m")
    ap.add_argument("--kv", default=",".join(OURS), help="our cache types")
    ap.add_argument("--speed-weights", default="float,q4_k_m")
    ap.add_argument("--speed-kv", default="f16,q8_0,int4,int2,int4:dequant")
    ap.add_argument("--decode-prompt", default="200,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ppl-chunk", type=int, default=32, help="tokens per forward when scoring")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-speed", action="store_true", help="perplexity rows only")
    ap.add_argument(
        "--no-ppl-dynamic",
        dest="ppl_dynamic",
        action="store_false",
        help="perplexity: leave out DynamicCache (f32; the baseline is our f16 cache)",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="decode timer: wall time, or the thread's CPU time (--threads 1; a loaded machine)",
    )
    ap.add_argument("--no-quanto", dest="quanto", action="store_false")
    ap.add_argument(
        "--quanto-speed", default="int4", help="transformers' quanto caches timed (int4,int2)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.weights = (
            "float,q8_0" if args.weights == parser().get_default("weights") else args.weights
        )
        args.speed_weights = "float"
    print(
        f"[kv_hf] {benchlib.machine()}; torch threads {args.threads or torch.get_num_threads()}",
        flush=True,
    )
    rows = run(args)
    print()
    print(report(rows))
    print(f"\n{benchlib.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
