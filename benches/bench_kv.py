"""KV-cache quantization: memory, quality, speed and concurrency of ferroquant's cache types
against llama.cpp's quantized caches (and transformers', through kv_hf.py when present).

    python benches/bench_kv.py                 # the issue's sizes (long on a shared machine)
    python benches/bench_kv.py --quick         # CI-size: short contexts, one weight type

Model: SmolLM2-135M (the shipped Q4_1 GGUF dequantized to f32, then requantized by ferroquant to
q8_0 and q4_k_m). Text: gensim's lee.cor, then lee_background.cor appended where a longer
context is needed. Sections:
- bytes per token of every type (exact, from the runtime; llama.cpp's q8_0 / q4_0 caches use the
  same ggml blocks, so the same formula);
- perplexity over the first `ctx` tokens (every position predicts the next; prompts fed in
  chunks of 256, which gives the one-batch logits bit for bit) per kv_type, and its increase
  over f16 on the same weights; llama.cpp's (flash attention on, type_k = type_v) f16 / q8_0 /
  q4_0 caches over the same tokens in the same run;
- the attention alone of one decode step (every layer, SmolLM2's heads) over a synthetic cache
  of `ctx` positions per type (no model prefill, so 8192 positions take seconds);
- decode tokens/s after a prompt of `ctx` tokens (greedy, --decode tokens), engines interleaved,
  median of --runs;
- whole decode steps (section "step"): the model's one-token step (matmuls, attention over the
  quantized cache, logits) over a cache of `ctx` positions filled with synthetic rows through the
  pool's append path (`LlamaRuntime.decode_step_seconds`: no prefill, so 8192 positions take
  seconds), types interleaved, median of --runs;
- concurrency: how many sequences of --seq-len positions a --budget pool holds (exact), and
  the aggregate decode tokens/s with that many decoding together: from generate_batch
  (section "concurrency", prompt = seq_len - --decode: a prefill of every sequence) or from
  batched steps over synthetic caches (section "concurrency-step", no prefill).

Types are `kv_type` names, optionally `:rot` / `:norot` to choose the rotation (default: the
type's own, docs/kv.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from functools import partial
from pathlib import Path

import benchlib
import numpy as np

benchlib.use_bench_llama()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from ferroquant import _native, defaults  # noqa: E402
from ferroquant.models.convert import quantize_gguf  # noqa: E402
from ferroquant.runtime import KV_TYPES, LlamaRuntime  # noqa: E402

from peers import require  # noqa: E402

GGML_KV = {"f16": 1, "q8_0": 8, "q4_0": 2, "q4_0-norot": 2}  # llama.cpp type_k / type_v
CHUNK = 256


def model_files(cache: Path, weights: list[str]) -> dict[str, Path]:
    from bench_e2e import f32_gguf

    cache.mkdir(parents=True, exist_ok=True)
    f32 = cache / "smollm2-135m-f32.gguf"
    if not f32.exists():
        f32_gguf(defaults.default_model_path(), f32)
    out = {}
    for w in weights:
        p = cache / f"smollm2-135m-{w}-fq.gguf"
        if not p.exists():
            quantize_gguf(f32, p, w)
        out[w] = p
    return out


def text_tokens(path: Path, n: int) -> list[int]:
    """The first `n` tokens of lee.cor, then lee_background.cor (the file's own tokenizer)."""
    from ferroquant.runtime import load_tokenizer

    tok = load_tokenizer(path)
    text = ""
    for name in ("lee.cor", "lee_background.cor"):
        text += defaults.gensim_text_path(name).read_text("latin-1") + "\n"
        ids = tok.encode(text)
        if len(ids) >= n:
            return [int(t) for t in ids[:n]]
    raise SystemExit(f"the texts hold only {len(ids)} tokens, fewer than {n}")


def nll_sum(logits: np.ndarray, targets: list[int]) -> float:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def spec(kv: str) -> dict:
    """ "int4:rot" -> kv_type int4, kv_rotation True (":norot" False, ":vrot" the values
    only; "int2@4/128": kv_sinks 4, kv_residual 128); a plain name keeps the type's default."""
    kv, _, window = kv.partition("@")
    t, _, r = kv.partition(":")
    d = {"kv_type": t, "kv_rotation": {"rot": True, "norot": False, "vrot": "values"}.get(r)}
    if window:  # "int2@S/R": KIVI sinks and residual (default: the type's)
        d["kv_sinks"], d["kv_residual"] = (int(x) for x in window.split("/"))
    return d


def ppl_ours(path: Path, kv: str, toks: list[int]) -> float:
    rt = LlamaRuntime.from_gguf(path, n_ctx=len(toks), kv_budget="4GiB", **spec(kv))
    total = 0.0
    for i in range(0, len(toks), CHUNK):
        lg = rt.forward(toks[i : i + CHUNK], all_logits=True)
        tg = toks[i + 1 : i + CHUNK + 1]
        total += nll_sum(lg[: len(tg)], tg)
    return float(np.exp(total / (len(toks) - 1)))


def llama(path: Path, n_ctx: int, kv: str, logits_all: bool, threads: int):
    """llama.cpp rotates Q/K/V with a Hadamard transform before a quantized cache (its
    `attn_rot_k/v`, on by default); "q4_0-norot" turns that off (LLAMA_ATTN_ROT_DISABLE) to
    compare the plain q4_0 cache with ours."""
    llama_cpp = require("llama_cpp")
    if kv.endswith("-norot"):
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    else:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=CHUNK, n_ubatch=CHUNK,
                           n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                           type_k=GGML_KV[kv], type_v=GGML_KV[kv], flash_attn=True,
                           verbose=False)  # fmt: skip


def ppl_llama(path: Path, kv: str, toks: list[int], threads: int) -> float:
    llm = llama(path, len(toks), kv, True, threads)
    try:
        llm.eval(toks)
        return float(np.exp(nll_sum(np.asarray(llm.scores[: len(toks) - 1]), toks[1:])
                            / (len(toks) - 1)))  # fmt: skip
    finally:
        llm.close()


def decode_ours(path: Path, kv: str, toks: list[int], n_dec: int) -> float:
    rt = LlamaRuntime.from_gguf(path, n_ctx=len(toks) + n_dec + 1, kv_budget="4GiB", **spec(kv))
    for i in range(0, len(toks) - 1, 512):
        rt.forward(toks[i : min(i + 512, len(toks) - 1)])
    g = rt.generate(toks[-1:], n_dec + 1, reset=False)
    return g.decode_tokens_per_second


def decode_llama(path: Path, kv: str, toks: list[int], n_dec: int, threads: int) -> float:
    llm = llama(path, len(toks) + n_dec + 1, kv, False, threads)
    try:
        llm.eval(toks)
        t0 = time.perf_counter()
        for i in range(n_dec):  # the text's tokens again (the speed does not depend on them)
            llm.eval([toks[i % len(toks)]])
        return n_dec / (time.perf_counter() - t0)
    finally:
        llm.close()


def step_tps(path: Path, kv: str, n_seqs: int, n_pos: int, reps: int, budget: str) -> float:
    """Aggregate tokens/s of batched decode steps over synthetic caches (no prefill)."""
    rt = LlamaRuntime.from_gguf(path, n_ctx=n_pos + reps, kv_budget=budget, **spec(kv))
    return n_seqs / rt.decode_step_seconds(n_seqs, n_pos, reps)


def capacity(path: Path, kv: str, seq_len: int, budget: str) -> int:
    rt = LlamaRuntime.from_gguf(path, n_ctx=seq_len, kv_budget=budget, **spec(kv))
    return rt.kv_capacity(seq_len)


def concurrency(path: Path, kv: str, toks: list[int], seq_len: int, budget: str,
                n_dec: int) -> tuple[int, float, int]:  # fmt: skip
    rt = LlamaRuntime.from_gguf(path, n_ctx=seq_len, kv_budget=budget, **spec(kv))
    n = rt.kv_capacity(seq_len)
    plen = seq_len - n_dec
    prompts = [toks[i * 7 % 97 :][:plen] for i in range(n)]  # n different prompts
    g = rt.generate_batch(prompts, max_new_tokens=n_dec)
    return n, g.decode_tokens_per_second, g.max_active


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_runs(ap, 3)
    ap.add_argument("--quick", action="store_true", help="CI-size run (short contexts)")
    ap.add_argument("--weights", default="q8_0,q4_k_m")
    ap.add_argument("--types", default=",".join(KV_TYPES))
    ap.add_argument("--ppl-ctx", default="2048,4096")
    ap.add_argument("--decode-ctx", default="512,2048,8192")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per speed run")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--budget", default="256MiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--llama-threads",
        type=int,
        help="llama.cpp's threads (default --threads; "
        "its spinning thread pool crawls on an overloaded machine)",
    )
    ap.add_argument(
        "--sections", default="bytes,ppl,attention,step,decode,concurrency-step,concurrency,hf"
    )
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                    "ferroquant-bench-e2e"))  # fmt: skip
    args = ap.parse_args()
    lt = args.llama_threads or args.threads
    if args.quick:
        args.weights, args.ppl_ctx, args.decode_ctx = "q8_0", "256", "128,512"
        args.seq_len, args.budget, args.decode, args.runs = 256, "16MiB", 8, 1
    import ferroquant as fq

    fq.set_num_threads(args.threads)
    types = [t for t in args.types.split(",") if t]
    weights = [w for w in args.weights.split(",") if w]
    ppl_ctx = [int(c) for c in args.ppl_ctx.split(",") if c]
    dec_ctx = [int(c) for c in args.decode_ctx.split(",") if c]
    print(f"# bench_kv {' '.join(sys.argv[1:])}")
    print(f"machine: {benchlib.machine()}; load at start {benchlib.load()}")
    files = model_files(Path(args.cache), weights)
    need = max(ppl_ctx + [c + 1 for c in dec_ctx] + [args.seq_len])
    toks = text_tokens(files[weights[0]], need)
    peers_kv = [] if args.no_llama else ["f16", "q8_0", "q4_0", "q4_0-norot"]

    rt = LlamaRuntime.from_gguf(files[weights[0]], n_ctx=256, kv_budget="64MiB")
    c = rt.config
    sections = set(args.sections.split(","))
    print("\n## Bytes per token (all layers, K and V)\n")
    rows = []
    for t in types if "bytes" in sections else []:
        bpt = LlamaRuntime.from_gguf(files[weights[0]], n_ctx=256, **spec(t)).kv
        rows.append([t, bpt["bytes_per_token"], f"{bpt['bytes_per_token'] / 23040:.3f}",
                     bpt["residual_bytes"]])  # fmt: skip
    for k in peers_kv[1:3] if "bytes" in sections else []:
        blk = {"q8_0": 34, "q4_0": 18}[k]
        bpt = c["n_layer"] * 2 * c["n_head_kv"] * c["head_dim"] // 32 * blk
        rows.append([f"llama.cpp {k}", bpt, f"{bpt / 23040:.3f}", 0])
    print(benchlib.table(["kv", "bytes/token", "vs f16", "residual bytes/sequence"], rows))

    print("\n## Perplexity (lee.cor [+ lee_background.cor], every position)\n")
    rows = []
    for w in weights if "ppl" in sections else []:
        for ctx in ppl_ctx:
            base = ppl_ours(files[w], "f16", toks[:ctx])
            for t in types:
                p = base if t == "f16" else ppl_ours(files[w], t, toks[:ctx])
                rows.append([w, ctx, "ferroquant", t, f"{p:.4f}", f"{100 * (p / base - 1):+.3f}%"])
                print("  ", rows[-1], benchlib.load(), flush=True)
            if peers_kv:
                lbase = ppl_llama(files[w], "f16", toks[:ctx], lt)
                for k in peers_kv:
                    p = lbase if k == "f16" else ppl_llama(files[w], k, toks[:ctx], lt)
                    rows.append([w, ctx, "llama.cpp", k, f"{p:.4f}",
                                 f"{100 * (p / lbase - 1):+.3f}%"])  # fmt: skip
                    print("  ", rows[-1], flush=True)
    print(benchlib.table(["weights", "ctx", "engine", "kv", "ppl", "vs own f16"], rows))

    print(f"\n## Decode tokens/s after a prompt of ctx tokens ({args.decode} tokens, median of "
          f"{args.runs}, engines interleaved)\n")  # fmt: skip
    rows = []
    for w in weights if "decode" in sections else []:
        for ctx in dec_ctx:
            prompt = toks[: ctx + 1]
            eng = {f"fq {t}": partial(decode_ours, files[w], t, prompt, args.decode)
                   for t in types}  # fmt: skip
            for k in peers_kv[:3]:
                eng[f"llama.cpp {k}"] = partial(decode_llama, files[w], k, prompt, args.decode, lt)
            res = benchlib.interleave(eng, args.runs)
            f16 = res["fq f16"] if "fq f16" in res else None
            for name, v in res.items():
                vs = benchlib.ratio(v, f16) if f16 else "-"
                rows.append([w, ctx, name, benchlib.spread(v), vs])
                print("  ", rows[-1], benchlib.load(), flush=True)
    print(benchlib.table(["weights", "ctx", "engine kv", "decode tok/s", "vs fq f16"], rows))

    if "step" in sections:
        print(f"\n## Whole decode steps over a synthetic cache of ctx positions (tokens/s, "
              f"median of {args.runs} interleaved runs, each the median of 3 steps)\n")  # fmt: skip
        rows = []
        w = weights[0]
        for ctx in dec_ctx:
            # ctx - 3 filled positions + 3 steps: the cache ends at ctx (8192 = the model's limit)
            eng = {t: partial(step_tps, files[w], t, 1, ctx - 3, 3, "4GiB") for t in types}
            res = benchlib.interleave(eng, args.runs)
            for t, v in res.items():
                vs = benchlib.ratio(v, res["f16"]) if "f16" in res else "-"
                rows.append([w, ctx, t, benchlib.spread(v), vs])
                print("  ", rows[-1], benchlib.load(), flush=True)
        print(benchlib.table(["weights", "ctx", "kv", "decode tok/s", "vs f16"], rows))

    if "concurrency-step" in sections:
        print(f"\n## Concurrency over synthetic caches: sequences of {args.seq_len} positions in "
              f"{args.budget}, batched decode steps (aggregate tokens/s, median of {args.runs} "
              f"interleaved runs, each the median of 3 steps)\n")  # fmt: skip
        rows = []
        w = weights[0]
        n = {t: capacity(files[w], t, args.seq_len, args.budget) for t in types}
        eng = {t: partial(step_tps, files[w], t, n[t], args.seq_len - 3, 3, args.budget)
               for t in types if n[t]}  # fmt: skip
        res = benchlib.interleave(eng, args.runs)
        for t, v in res.items():
            vs_n = f"{n[t] / n['f16']:.2f}x" if "f16" in n else "-"
            vs = benchlib.ratio(v, res["f16"]) if "f16" in res else "-"
            rows.append([w, t, n[t], benchlib.spread(v), vs_n, vs])
            print("  ", rows[-1], benchlib.load(), flush=True)
        print(benchlib.table(["weights", "kv", "sequences", "aggregate tok/s",
                              "sequences vs f16", "tok/s vs f16"], rows))  # fmt: skip

    if "attention" in sections:
        print(f"\n## Attention alone: one decode step, every layer, over a synthetic cache "
              f"(seconds, median of 5 inside each of {args.runs} interleaved runs)\n")  # fmt: skip
        rows = []
        for ctx in dec_ctx:
            eng = {t: partial(_native.kv_decode_attention_seconds, spec(t)["kv_type"],
                              c["n_layer"], c["n_head"], c["n_head_kv"], c["head_dim"], ctx, 5,
                              spec(t)["kv_rotation"])
                   for t in types}  # fmt: skip
            res = benchlib.interleave(eng, args.runs)
            for t, v in res.items():
                vs = benchlib.ratio(v, res["f16"], higher_is_better=False) if "f16" in res else "-"
                rows.append([ctx, t, benchlib.spread([1e3 * x for x in v], ".2f"), vs])
                print("  ", rows[-1], benchlib.load(), flush=True)
        print(benchlib.table(["ctx", "kv", "ms per step", "speed vs f16"], rows))

    print(f"\n## Concurrency: sequences of {args.seq_len} positions in {args.budget}, "
          f"generate_batch ({args.decode} new tokens each)\n")  # fmt: skip
    rows = []
    w = weights[0]
    got = {}
    for t in types if "concurrency" in sections else []:
        n, tps, act = concurrency(files[w], t, toks, args.seq_len, args.budget, args.decode)
        got[t] = (n, tps)
        rows.append([w, t, n, act, f"{tps:.1f}"])
        print("  ", rows[-1], benchlib.load(), flush=True)
    if "f16" in got:
        for r in rows:
            n, tps = got[r[1]]
            r += [f"{n / got['f16'][0]:.2f}x", f"{tps / got['f16'][1]:.2f}x"]
    print(benchlib.table(["weights", "kv", "sequences", "decoded together", "aggregate tok/s",
                          "sequences vs f16", "tok/s vs f16"], rows))  # fmt: skip

    if "hf" in sections and (Path(__file__).parent / "kv_hf.py").exists():
        kv_hf = importlib.import_module("kv_hf")
        hf_rows = kv_hf.run(args)
        if hf_rows:
            print("\n## transformers (benches/kv_hf.py)\n")
            print(benchlib.table(list(hf_rows[0].keys()), [list(r.values()) for r in hf_rows]))
    print(f"\nload at end {benchlib.load()}")


if __name__ == "__main__":
    main()
