"""QLoRA on the CPU (issue 16, point 3): step time and peak RSS of LoRA over ferroquant's nf4
QuantLinear against LoRA over bitsandbytes' 4-bit nf4 Linear4bit (peft's own dispatcher) and
against LoRA over the bf16 model; then the merged ferroquant model exported to GGUF and its
held-out perplexity in llama.cpp against ours.

Both 4-bit engines run in each compute dtype: bfloat16 (ferroquant's default training forward,
QuantLinear.train_dtype; bitsandbytes' compute_dtype=torch.bfloat16, the usual QLoRA setting)
and float32; the model around them stays float32 in every 4-bit engine. Ratios are printed
against bitsandbytes in both dtypes.

Protocol: SmolLM2-135M-Instruct (the default GGUF, dequantized by transformers to float32), every
Linear but lm_head (tied to the embedding) in the engine's format; peft LoRA r=--rank,
alpha=2r, no dropout, on q_proj and v_proj; the same windows of gensim's lee_background.cor
(batches of --batch x --seq-len in ferroquant.train.loop's seeded order), AdamW lr 1e-4, grad-norm
clip 1 (ferroquant.train.loop.Trainer, the same loop for every engine); the first step is a
warm-up and is not timed. Each engine runs in its own subprocess, engines one after another,
--runs rounds interleaved; medians. Peak RSS while training (RssSampler: the kernel's VmHWM,
reset after the model is built and loading's garbage is freed); the whole process's ru_maxrss is
printed too (transformers' GGUF loading dominates it, the same for every engine). --threads:
torch and ferroquant threads (1 by default: the machine is shared).

The loss: bitsandbytes and bf16 engines take the model's own (transformers': the whole float32
lm_head, then cross-entropy); the ferroquant engines take what `ferroquant finetune --lora` uses,
ferroquant.train.fused_loss (the frozen lm_head and the cross-entropy fused and chunked, the
head's GEMMs in the base layers' compute dtype: bfloat16 in the bf16-compute engine), except
engine 5, which keeps the model's own loss to show what the fused loss changes.

Step time is printed twice: wall clock (Trainer's) and the process's CPU time (time.process_time,
all threads; torch runs one), which a loaded machine's time slicing inflates far less.

--profile: after the timed steps each run profiles one more step (torch.profiler, self CPU time
of every op, summed by part of the model: base-layer GEMMs, their dequantization and op
overhead, LoRA, the lm_head GEMMs, the loss, attention, the optimizer, the rest); the table shows
where the engines differ and where they run the same model code.

Merge check (ferroquant's run of the first round): merge_lora(model, --merge-qtype, default
q8_0) (nf4 cannot go in a GGUF: every layer re-quantized; nf4 re-rounded to q4_0 costs far more
than either rounding alone on this model), save_gguf_model, perplexity on lee.cor's first
--eval-tokens tokens in windows of 512 by our model and by llama.cpp (llama-cpp-python) on the
same token ids.

    python benches/bench_qlora.py [--steps 3] [--batch 4] [--seq-len 256] [--rank 8] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ENGINES = (
    "ferroquant nf4 + LoRA, bf16 compute",
    "bitsandbytes nf4 + peft LoRA, f32 compute",
    "bitsandbytes nf4 + peft LoRA, bf16 compute",
    "ferroquant nf4 + LoRA, f32 compute",
    "bf16 + peft LoRA",
    "ferroquant nf4 + LoRA, bf16 compute, model's own loss",
)
# the ratios' denominators: bitsandbytes in each compute dtype
BNB = {"f32": ENGINES[1], "bf16": ENGINES[2]}


def _compute_dtype(engine: str) -> torch.dtype:
    return torch.bfloat16 if "bf16 compute" in engine else torch.float32


def _bnb_nf4(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Every nn.Linear but lm_head -> bitsandbytes Linear4bit nf4 (block 64, no double quant:
    ferroquant's nf4 layout), compute in `compute_dtype` (Linear4bit casts the float32
    activations to it and its output back), quantized on the CPU."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(
            mod.in_features,
            mod.out_features,
            bias=mod.bias is not None,
            compress_statistics=False,
            quant_type="nf4",
            compute_dtype=compute_dtype,
        )
        q.weight = bnb.nn.Params4bit(
            mod.weight.data.clone(),
            requires_grad=False,
            compress_statistics=False,
            quant_type="nf4",
            blocksize=64,
        )
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.data.clone(), requires_grad=False)
        q = q.to("cpu")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)


class RssSampler:
    """The process's peak RSS while training, after a gc and malloc_trim so that what loading
    the model freed is not counted (ru_maxrss, the whole process's peak, is dominated by
    transformers' GGUF loading: the same for every engine). Exact where the kernel allows it:
    writing 5 to /proc/self/clear_refs resets the peak (VmHWM), read back at the end; else
    /proc/self/statm sampled every 5 ms from a thread (which a loaded machine's time slicing
    can make miss a short peak)."""

    def __init__(self) -> None:
        import ctypes
        import gc
        import os
        import threading

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.page = os.sysconf("SC_PAGE_SIZE")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.peak, self.done = self._rss(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def _hwm(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        peak = max(self.peak, self._rss())
        if self.exact:
            peak = max(peak, self._hwm())
        return peak / 2**20


# --profile: one more step under torch.profiler, its self CPU time summed by the part of the
# model it belongs to (read from the op name and its input shapes).
PARTS = (
    "base-layer GEMMs",
    "base-layer dequantization + op overhead",
    "LoRA adapters",
    "lm_head GEMMs (49152 wide; float32, fused: bfloat16)",
    "loss (log-softmax, NLL; fused: logsumexp, softmax gradient, W cast)",
    "attention (SDPA)",
    "optimizer (AdamW, grad clip)",
    "elementwise, norms, RoPE, casts, other",
)


def _part(name: str, shapes: list, vocab: int, rank: int) -> str:
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s}
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"):
        if vocab in dims:
            return PARTS[3]
        return PARTS[2] if rank in dims else PARTS[0]
    if "scaled_dot_product" in name:
        return PARTS[5]
    if "log_softmax" in name or "nll_loss" in name or vocab in dims:
        return PARTS[4]
    if "ferroquant" in name or "dequantize_4bit" in name or "MatMul4Bit" in name:
        return PARTS[1]
    if "Optimizer" in name or "_foreach" in name or "clip_grad" in name:
        return PARTS[6]
    return PARTS[7]


def profile_step(trainer: Any, vocab: int, rank: int) -> dict[str, float]:
    """Self CPU seconds of one training step by part of the model (see PARTS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.step()
    parts = dict.fromkeys(PARTS, 0.0)
    for ev in prof.key_averages(group_by_input_shape=True):
        parts[_part(ev.key, ev.input_shapes or [], vocab, rank)] += ev.self_cpu_time_total / 1e6
    return parts


def _llama_ppl(path: Path, ids: list[int], ctx: int = 512) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_threads=1, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        w = ids[s : s + ctx]
        if len(w) < 2:
            break
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        m = logits.max(1, keepdims=True)
        lp = logits - (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))
        nll -= float(sum(lp[i, w[i + 1]] for i in range(len(w) - 1)))
        count += len(w) - 1
    del llm
    return math.exp(nll / count)


def worker(engine: str, args: Any) -> dict[str, Any]:
    import ferroquant as fq
    from ferroquant.calib.data import read_calibration_text
    from ferroquant.train.finetune import load_float_model
    from ferroquant.train.loop import TrainConfig, Trainer, training_windows

    torch.set_num_threads(args.threads)
    fq.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_float_model(None)
    targets = ["q_proj", "v_proj"]
    if engine.startswith("ferroquant"):
        from ferroquant.nn import QuantLinear
        from ferroquant.train.lora import apply_lora

        fq.quantize_model(model, "nf4", progress=False)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.train_dtype = _compute_dtype(engine)
        pm = apply_lora(model, r=args.rank, targets=targets)
    else:
        import peft

        if engine.startswith("bitsandbytes"):
            _bnb_nf4(model, _compute_dtype(engine))
        else:
            model = model.to(torch.bfloat16)
        cfg = peft.LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        pm = peft.get_peft_model(model, cfg)
    # ferroquant's loss: the fused lm_head + cross-entropy (what `ferroquant finetune --lora`
    # uses), but in the engine that keeps the model's own loss for comparison
    fused = engine.startswith("ferroquant") and not engine.endswith("own loss")
    cfg = TrainConfig(steps=args.steps + 1, lr=1e-4, batch=args.batch, seq_len=args.seq_len,
                      fused_loss=fused)  # fmt: skip
    text, _ = read_calibration_text(None)
    trainer = Trainer(pm, training_windows(tok, text, cfg), cfg)
    sampler = RssSampler()
    cpu = []
    for _ in range(cfg.steps):
        c0 = time.process_time()
        trainer.step()
        cpu.append(time.process_time() - c0)
    out: dict[str, Any] = {
        "step_s": trainer.log.step_seconds[1:],
        "step_cpu_s": cpu[1:],
        "losses": trainer.log.losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_mb": sampler.stop(),
    }
    if args.profile:
        vocab = model.get_output_embeddings().weight.shape[0]
        out["profile"] = profile_step(trainer, vocab, args.rank)
    if engine.startswith("ferroquant") and args.merge:
        from ferroquant.eval.load import read_text, tokenize
        from ferroquant.train.loop import perplexity
        from ferroquant.train.lora import merge_lora

        merged = merge_lora(pm, args.merge_qtype)
        ids = tokenize(tok, read_text(None)[0])[: args.eval_tokens]
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "merged.gguf"
            fq.save_gguf_model(merged, path, tokenizer=model.ferroquant_gguf)
            out["ppl_ours"] = perplexity(merged, ids, 512, 0)
            out["ppl_llama_cpp"] = _llama_ppl(path, [int(i) for i in ids])
    return out


def run(args: Any) -> dict[str, Any]:
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.runs):
        for i, engine in enumerate(ENGINES):
            if i not in args.engines:
                continue
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(i),
                    "--out",
                    f.name,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--seq-len",
                    str(args.seq_len),
                    "--rank",
                    str(args.rank),
                    "--threads",
                    str(args.threads),
                    "--eval-tokens",
                    str(args.eval_tokens),
                    "--merge-qtype",
                    args.merge_qtype,
                ]
                if r == 0 and i == 0 and not args.no_merge:
                    cmd.append("--merge")
                if args.profile:
                    cmd.append("--profile")
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True)
                res = json.loads(Path(f.name).read_text())
            print(
                f"{engine}: run {r + 1} {time.perf_counter() - t0:.0f} s; steps "
                f"{' '.join(f'{s:.2f}' for s in res['step_s'])} s (CPU "
                f"{' '.join(f'{s:.2f}' for s in res['step_cpu_s'])} s); peak RSS "
                f"{res['train_rss_mb']:.0f} MB training",
                flush=True,
            )
            results[engine].append(res)
    return results


def report(results: dict[str, list[dict]], args: Any) -> dict[str, Any]:
    results = {e: rs for e, rs in results.items() if rs}
    step = {e: benchlib.med([s for r in rs for s in r["step_s"]]) for e, rs in results.items()}
    cpu = {e: benchlib.med([s for r in rs for s in r["step_cpu_s"]]) for e, rs in results.items()}
    rss = {e: benchlib.med([r["train_rss_mb"] for r in rs]) for e, rs in results.items()}
    whole = {e: benchlib.med([r["peak_rss_mb"] for r in rs]) for e, rs in results.items()}
    ours = ENGINES[0]
    bnbs = {d: e for d, e in BNB.items() if e in step}

    def cells(e: str, v: dict[str, float]) -> list[str]:
        return [f"{v[e] / v[b]:.2f}x" for b in bnbs.values()]

    def steps(e: str, key: str) -> str:
        return " ".join(f"{s:.2f}" for r in results[e] for s in r[key])

    rows = [
        [e, f"{step[e]:.2f} ({steps(e, 'step_s')})"]
        + cells(e, step)
        + [f"{cpu[e]:.2f} ({steps(e, 'step_cpu_s')})"]
        + cells(e, cpu)
        + [f"{rss[e]:.0f}"]
        + cells(e, rss)
        for e in step
    ]
    vs = [f"vs bnb {d}" for d in bnbs]
    heads = ["engine", "median wall s/step (all)", *vs, "median CPU s/step (all)", *vs,
             "peak RSS training MB", *vs]  # fmt: skip
    print(benchlib.table(heads, rows))
    print(
        "whole-process peak RSS (model loading included) MB: "
        + ", ".join(f"{e} {v:.0f}" for e, v in whole.items())
    )
    out: dict[str, Any] = {
        "median_step_s": step,
        "median_step_cpu_s": cpu,
        "train_rss_mb": rss,
        "peak_rss_mb": whole,
    }
    profiled = {e: rs for e, rs in results.items() if "profile" in rs[0]}
    if profiled:
        prof = {e: {p: benchlib.med([r["profile"][p] for r in rs]) for p in PARTS}
                for e, rs in profiled.items()}  # fmt: skip
        rows = [[p] + [f"{prof[e][p]:.2f} ({100 * prof[e][p] / sum(prof[e].values()):.0f} %)"
                       for e in prof] for p in PARTS]  # fmt: skip
        rows.append(["total (profiled step)"] + [f"{sum(prof[e].values()):.2f}" for e in prof])
        print("one profiled step, self CPU s by part (median over rounds):")
        print(benchlib.table(["part", *prof], rows))
        out["profile"] = prof
    first = results[ours][0] if ours in results else {}
    if "ppl_ours" in first:
        po, pl = first["ppl_ours"], first["ppl_llama_cpp"]
        print(
            f"merged ({args.merge_qtype}) GGUF, lee.cor first {args.eval_tokens} tokens, ctx 512: "
            f"ppl ours {po:.3f}, llama.cpp {pl:.3f}, difference {100 * (pl / po - 1):+.2f} %"
        )
        out["merged_ppl"] = {"ours": po, "llama.cpp": pl}
    if ours in step:
        for d, b in bnbs.items():
            print(
                f"targets vs bnb {d} compute: step time <= 0.8x ({step[ours] / step[b]:.2f}x "
                f"wall, {cpu[ours] / cpu[b]:.2f}x CPU), peak RSS <= bnb ({rss[ours] / rss[b]:.2f}x)"
            )
    return out


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="one more step per run under torch.profiler: self CPU time by part of the model",
    )
    ap.add_argument(
        "--engines",
        type=lambda v: {int(i) for i in v.split(",")},
        default=set(range(len(ENGINES))),
        help="indices into " + "; ".join(f"{i}: {e}" for i, e in enumerate(ENGINES)),
    )
    ap.add_argument(
        "--merge-qtype",
        default="q8_0",
        help="the ggml qtype the merged model is written in (nf4 has no GGUF type; re-rounding "
        "nf4 to q4_0 measured 253 ppl against 39.6 for q4_0 from float: use q8_0)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.worker is not None:
        args.out.write_text(json.dumps(worker(ENGINES[args.worker], args)))
        return 0
    print(f"# bench_qlora: {benchlib.machine()}; {args.threads} thread(s); load {benchlib.load()}")
    res = report(run(args), args)
    res["load_end"] = benchlib.load()
    print(f"load at end {res['load_end']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
