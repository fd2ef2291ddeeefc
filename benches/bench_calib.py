"""RTN vs GPTQ vs AWQ vs AWQ+GPTQ on the default model (SmolLM2-135M-Instruct), one run, one table.

Rows: llama.cpp mixes / qtypes, and the grouped integer format of GPTQ / AWQ checkpoints at
group 64 (`int4_g64`: SmolLM2's 576-wide rows are not whole groups of 128).

Protocol: the baseline is the model's weights held in bf16 (as `ferroquant eval` loads the
default GGUF); every row quantizes a fresh copy with `quantize_model(copy, recipe, method=...)`
(embeddings / tied output head stay bf16). GPTQ and AWQ (AWQConfig's defaults: grid 20,
duo_scaling, clip) calibrate on gensim's lee_background.cor
(`--calib-samples` x `--calib-len` consecutive tokens); scoring is on the held-out lee.cor with
eval's own windows and metrics (ctx 512, stride 512, 2048 scored tokens): perplexity, mean
KL(baseline || row), top-1 agreement. Time = wall time of quantize_model, CPU = this process's
CPU time during it (all threads: on a shared machine the fairer measure); peak = the largest
resident-set growth during it (sampled every 50 ms). `--threads N` sets torch's threads for
every engine (they all run in this process).

Peers (`--peers gptqmodel,llmcompressor,gptqmodel-awq,llmcompressor-awq`, `calib_peers.py`): at
each int4 grouped row (e.g. int4_g64) GPTQModel's and llm-compressor's GPTQ (and, `-awq`, their
AWQ), W4A16 with the row's group, asymmetric, on the same calibration tokens, scored the same way;
their time is their quantize call's, and the table gives the ratio of each peer's time to our
same method's. `--llama-cpp`: our GPTQ q4_k_m model is written to
a GGUF (`save_gguf_model`, bytes as they are) and llama.cpp (llama-cpp-python) scores that file
on the same windows; the perplexities are printed side by side.

    python benches/bench_calib.py [--calib-samples 128] [--calib-len 512] [--rows q4_0,nf4,...]
                                  [--no-act-order] [--methods rtn,gptq,awq,awq+gptq]
                                  [--true-sequential] [--asym-alpha 0.25 (0: plain)] [--damp 0.01]
                                  [--peers gptqmodel,llmcompressor] [--llama-cpp]
                                  [--layers N (timing only)] [--awq-screen-stride 4]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch
from calib_peers import (
    gptqmodel_awq,
    gptqmodel_gptq,
    llmcompressor_awq,
    llmcompressor_gptq,
    save_base,
)

import ferroquant as fq
from ferroquant.calib import calibration_ids
from ferroquant.defaults import default_model_path
from ferroquant.eval.load import load_model, read_text, tokenize
from ferroquant.eval.metrics import Scores, make_windows
from ferroquant.methods import AWQConfig, GPTQConfig
from ferroquant.qtypes import gint_params


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The largest resident-set growth while the block runs (sampled)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--rows", default="q4_0,nf4,q4_k_m,q3_k,int4_g64")
    ap.add_argument("--no-act-order", action="store_true", help="GPTQ in natural column order")
    ap.add_argument("--methods", default="rtn,gptq,awq,awq+gptq", help="ours ('': peers only)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--peers", default="", help="at int4 grouped rows: " + ",".join(PEERS))
    ap.add_argument("--llama-cpp", action="store_true", help="score our GPTQ q4_k_m in llama.cpp")
    ap.add_argument("--scale-search", type=int, default=GPTQConfig.scale_search,
                    help="GPTQ's block-scale search steps (0: absmax)")  # fmt: skip
    ap.add_argument(
        "--true-sequential",
        action="store_true",
        help="GPTQ: solve a layer's groups in forward order on recomputed inputs",
    )
    ap.add_argument(
        "--asym-alpha",
        type=float,
        default=GPTQConfig.asym_alpha,
        help="GPTQ: asymmetric (GPTAQ) target's alpha (0: plain GPTQ)",
    )
    ap.add_argument("--damp", type=float, default=GPTQConfig.damp, help="GPTQ's damping")
    ap.add_argument("--layers", type=int, default=0,
                    help="keep the first N decoder layers only (timing runs: the scores are "
                    "then not the model's)")  # fmt: skip
    ap.add_argument("--awq-screen-stride", type=int, default=None,
                    help="AWQ's window screen (1: every candidate on every window; default: "
                    "AWQConfig's)")  # fmt: skip
    ap.add_argument("--awq-float-inputs", action=argparse.BooleanOptionalAction, default=None,
                    help="AWQ: next layer inputs from the float layer")  # fmt: skip
    ap.add_argument("--awq-clip-tokens", type=int, default=None,
                    help="AWQ: clip search tokens (0: all; default: AWQConfig's)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for every engine (0: torch's default)")  # fmt: skip
    args = ap.parse_args()
    if args.threads > 0:  # the same for ours and the peers (they run in this process)
        torch.set_num_threads(args.threads)

    loaded = load_model(None)
    base, tok = loaded.model, loaded.tokenizer
    if args.layers > 0:
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
    text, text_what = read_text(None)
    ids = tokenize(tok, text)
    windows = make_windows(int(ids.numel()), args.ctx, args.ctx, args.max_tokens)
    with torch.no_grad():
        base_logits = [base(ids[None, w.start : w.end]).logits[0] for w in windows]
    calib = calibration_ids(None, tok, args.calib_samples, args.calib_len)
    cfg = GPTQConfig(
        n_samples=args.calib_samples,
        seq_len=args.calib_len,
        act_order=not args.no_act_order,
        scale_search=args.scale_search,
        true_sequential=args.true_sequential,
        asym_alpha=args.asym_alpha,
        damp=args.damp,
    )
    awq_set = {"float_inputs": args.awq_float_inputs, "clip_tokens": args.awq_clip_tokens,
               "screen_stride": args.awq_screen_stride}  # fmt: skip
    acfg = AWQConfig(
        n_samples=args.calib_samples,
        seq_len=args.calib_len,
        gptq_act_order=not args.no_act_order,
        **{k: v for k, v in awq_set.items() if v is not None},  # unset: the library's default
    )
    methods = [m for m in args.methods.split(",") if m]  # "": the peers only

    def score(model: torch.nn.Module) -> Scores:
        s = Scores()
        with torch.no_grad():
            for w, bl in zip(windows, base_logits, strict=True):
                lo = model(ids[None, w.start : w.end]).logits[0]
                a, z = w.first - w.start - 1, w.end - w.start - 1  # as eval/run.py slices
                s.add(lo[a:z], bl[a:z], ids[w.first : w.end])
        return s

    b = score(base)
    tmp = tempfile.TemporaryDirectory(prefix="bench-calib-")
    folder_made: list[Path] = []

    def hf_folder() -> Path:
        """The baseline as a Hugging Face folder (the peers' input), written once."""
        if not folder_made:
            folder_made.append(Path(tmp.name) / "base")
            save_base(base, tok, folder_made[0])
        return folder_made[0]

    llama_line = ""
    rows = [("bf16", "-", b, 0.0, 0.0, 0.0)]
    for recipe in args.rows.split(","):
        for method in methods:
            m = copy.deepcopy(base)
            t0, c0 = time.perf_counter(), time.process_time()
            with PeakRSS() as peak:
                conf = cfg if method == "gptq" else acfg
                kw = {"calibration": calib, "config": conf} if method != "rtn" else {}
                fq.quantize_model(m, recipe, method=method, progress=False, **kw)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            s = score(m)
            rows.append((recipe, method, s, dt, cpu, peak.growth_mb))
            print(f"{recipe:7} {method:8} ppl {s.ppl():.3f} kl {s.mean_kl():.4f} "
                  f"top1 {s.top1_rate():.3f} {dt:.1f} s, CPU {cpu:.1f} s", flush=True)  # fmt: skip
            if args.llama_cpp and recipe == "q4_k_m" and method == "gptq":
                llama = _llama_cpp_ppl(m, ids, windows)
                llama_line = (f"q4_k_m gptq: ppl ours {s.ppl():.3f}, llama.cpp on our GGUF "
                              f"{llama:.3f} ({100 * (llama / s.ppl() - 1):+.2f} %)")  # fmt: skip
                print(llama_line, flush=True)
            del m
        group = gint_group(recipe)
        for peer in (p for p in args.peers.split(",") if p) if group else ():
            folder = hf_folder()
            with PeakRSS() as peak:
                m, (dt, cpu) = PEERS[peer](base, folder, calib, group)
            s = score(m)
            rows.append((recipe, peer, s, dt, cpu, peak.growth_mb))
            print(f"{recipe:7} {peer:8} ppl {s.ppl():.3f} kl {s.mean_kl():.4f} "
                  f"top1 {s.top1_rate():.3f} {dt:.1f} s, CPU {cpu:.1f} s", flush=True)  # fmt: skip
            del m

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    print()
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, CPU {cpu}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    print(f"model: {loaded.source}; baseline: {loaded.baseline}")
    print(f"eval: {text_what}; ctx {args.ctx}, stride {args.ctx}, {b.n} scored tokens")
    print(f"calibration: gensim lee_background.cor, {calib.shape[0]} x {calib.shape[1]} tokens; "
          f"{cfg.describe()}; {acfg.describe()}")  # fmt: skip
    print()
    print("| recipe | method | ppl | Δppl | mean KL | top-1 | quantize s | CPU s | peak RSS +MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe, method, s, dt, cpu, mb in rows:
        print(f"| {recipe} | {method} | {s.ppl():.3f} | {s.ppl() - b.ppl():+.3f} | "
              f"{s.mean_kl():.4f} | {s.top1_rate():.3f} | {dt:.1f} | {cpu:.1f} | "
              f"{mb:.0f} |")  # fmt: skip
    print()
    if llama_line:
        print(llama_line)
    for recipe in args.rows.split(","):
        t = {m: (dt, cpu) for r, m, _, dt, cpu, _ in rows if r == recipe}
        for peer, ours in PEER_METHOD.items():
            if peer in t and t.get(ours):
                print(f"{recipe}: {peer} takes {t[peer][0] / t[ours][0]:.2f}x our {ours}'s wall "
                      f"time, {t[peer][1] / t[ours][1]:.2f}x its CPU time")  # fmt: skip
    for recipe in args.rows.split(","):
        d = {m: s.ppl() - b.ppl() for r, m, s, *_ in rows if r == recipe}
        if d.get("rtn", 0) > 0:
            for method in methods[1:] if methods[0] == "rtn" else methods:
                if method in d and method != "rtn":
                    cut = 1 - d[method] / d["rtn"]
                    print(f"{recipe}: {method} removes {100 * cut:.0f} % of RTN's perplexity "
                          "increase")  # fmt: skip


def gint_group(recipe: str) -> int | None:
    """The group of an int4 grouped-integer row with zero points (int4_g64 -> 64), else None."""
    gi = gint_params(recipe) if recipe.startswith("int4_g") else None
    return gi.group if gi is not None and not gi.sym and gi.group > 0 else None


def _llama_cpp_ppl(model: torch.nn.Module, ids: torch.Tensor, windows: list) -> float:
    """llama.cpp's perplexity of `model` written as a GGUF, on eval's windows of `ids`."""
    import llama_cpp

    from ferroquant.eval.llamacpp import _score
    from ferroquant.models.gguf_model import save_gguf_model

    gguf = default_model_path()  # the default model's GGUF: its tokenizer keys
    ctx = max(w.end - w.start for w in windows)
    with tempfile.TemporaryDirectory(prefix="bench-calib-gguf-") as tmp:
        path = Path(tmp) / "gptq.q4_k_m.gguf"
        save_gguf_model(model, path, tokenizer=gguf)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                              logits_all=True, n_threads=2, verbose=False)  # fmt: skip
        try:
            _, scores = _score(llm, [int(i) for i in ids], windows, None)
        finally:
            if hasattr(llm, "close"):
                llm.close()
    return scores.ppl()


PEERS = {
    "gptqmodel": gptqmodel_gptq,
    "llmcompressor": llmcompressor_gptq,
    "gptqmodel-awq": gptqmodel_awq,
    "llmcompressor-awq": llmcompressor_awq,
}
PEER_METHOD = {peer: "awq" if peer.endswith("-awq") else "gptq" for peer in PEERS}  # ours to match


if __name__ == "__main__":
    main()
