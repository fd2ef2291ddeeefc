"""Training with quantization on the default model (SmolLM2-135M-Instruct) on the CPU: how much of
the q4_0 PTQ perplexity increase QAT recovers, against fine-tuning then PTQ and against torchao's
QAT; and ternary (BitNet b1.58 absmean) QAT's loss curve and held-out perplexity.

Protocol: the model is the default GGUF dequantized by transformers, held in float32 (training
and scoring). Training text gensim's lee_background.cor, cut into windows of --seq-len tokens
from its start, batches of --batch in one seeded shuffled order (the same for every engine),
AdamW (ferroquant.train.loop.TrainConfig: lr --lr, no warm-up, grad-norm clip 1); embeddings,
norms and the tied head train too, every Linear but lm_head is quantized. Scoring: held-out
lee.cor, its first --eval-tokens tokens in windows of 512, perplexity.

Rows, each on a fresh copy of the model; ferroquant's and torchao's QAT are stepped in turn (one
step of each, then the next), so their step times share the machine's load; plain fine-tuning
and ternary QAT run after them, alone. One thread for torch and ferroquant (--threads):
- float: the model itself; PTQ: quantize_model(copy, "q4_0") (RTN, the kernels' q4_0).
- fine-tune + PTQ: N plain float steps, then quantize_model(., "q4_0").
- ferroquant QAT: qat.prepare(., "q4_0") (forward on the Rust q4_0 kernel, q8_0 activations),
  N steps, qat.convert -> QuantLinear; scored on the kernel.
- torchao QAT (peer): QATConfig(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
  weight_granularity=PerGroup(32)), step="prepare"), N steps, step="convert"; its own PTQ is
  the same config applied to the untrained model. Recovered fraction against its own PTQ.
- ternary QAT: qat.prepare(., "ternary"), N steps; scored with the ternary weights (report only).
recovered = (ppl_PTQ - ppl_row) / (ppl_PTQ - ppl_float).

    python benches/bench_train.py [--steps 16] [--batch 2] [--seq-len 128] [--lr 1e-4]
                                  [--eval-tokens 2048] [--threads 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import ferroquant as fq  # noqa: E402
from ferroquant.calib.data import read_calibration_text  # noqa: E402
from ferroquant.eval.load import read_text, tokenize  # noqa: E402
from ferroquant.train import qat  # noqa: E402
from ferroquant.train.loop import TrainConfig, Trainer, perplexity, training_windows  # noqa: E402


def load_float_model() -> tuple[Any, Any]:
    """The default GGUF as a float32 transformers model (as `ferroquant finetune` loads it)."""
    from ferroquant.train.finetune import load_float_model as load

    return load(None)


def torchao_config() -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)
    )


def _not_head(mod: nn.Module, fqn: str) -> bool:
    return isinstance(mod, nn.Linear) and not fqn.endswith("lm_head")


def torchao_ptq(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_

    quantize_(model, torchao_config(), filter_fn=_not_head)
    return model


def torchao_prepare(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(torchao_config(), step="prepare"), filter_fn=_not_head)
    return model


def torchao_convert(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(torchao_config(), step="convert"), filter_fn=_not_head)
    return model


def qlora_section(base: nn.Module, tok: Any, cfg: TrainConfig, args: Any) -> dict | None:
    """The QLoRA rows (issue 16, point 3): nf4 + LoRA against bitsandbytes + peft and bf16 LoRA,
    each engine in its own subprocess for a clean RSS (benches/bench_qlora.py, which also runs
    alone); same batch and sequence length as the QAT rows, rank 8 on q/v, 3 timed steps."""
    import bench_qlora

    qa = argparse.Namespace(
        steps=3,
        batch=cfg.batch,
        seq_len=cfg.seq_len,
        rank=8,
        runs=1,
        threads=args.threads,
        eval_tokens=args.eval_tokens,
        no_merge=False,
        merge_qtype="q8_0",
    )
    print("\n# QLoRA (benches/bench_qlora.py)", flush=True)
    return bench_qlora.report(bench_qlora.run(qa), qa)


def recovered(ptq: float, row: float, base: float) -> float:
    return (ptq - row) / (ptq - base) if ptq != base else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ferroquant threads (1: on a machine shared by several jobs, "
        "two threads were 6x slower than one, measured 2026-12-06)",
    )
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fq.set_num_threads(args.threads)
    print(f"# bench_train: {benchlib.machine()}; {args.threads} thread(s)", flush=True)
    torch.manual_seed(0)
    base, tok = load_float_model()
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch=args.batch, seq_len=args.seq_len)
    text, _ = read_calibration_text(None)
    windows = training_windows(tok, text, cfg)
    eval_text, eval_what = read_text(None)
    eval_ids = tokenize(tok, eval_text)

    def ppl(m: nn.Module) -> float:
        return perplexity(m, eval_ids, 512, args.eval_tokens)

    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "config": cfg.describe(),
        "eval": f"{eval_what}, first {args.eval_tokens} tokens, ctx 512",
        "ppl": {},
    }
    res["ppl"]["float"] = ppl(base)
    res["ppl"]["ptq q4_0"] = ppl(fq.quantize_model(copy.deepcopy(base), "q4_0", progress=False))
    print(f"float {res['ppl']['float']:.3f}  ptq q4_0 {res['ppl']['ptq q4_0']:.3f}", flush=True)

    logs: dict[str, Any] = {}

    def run_phase(engines: dict[str, nn.Module]) -> None:
        """Train the engines, one step of each in turn (so their step times share the load)."""
        trainers = {k: Trainer(m, windows, cfg) for k, m in engines.items()}
        for step in range(cfg.steps):
            line = []
            for name, t in trainers.items():
                loss, dt = t.step()
                line.append(f"{name} {loss:.3f} ({dt:.1f} s)")
            print(f"step {step + 1}/{cfg.steps}: " + "; ".join(line), flush=True)
        logs.update({k: t.log for k, t in trainers.items()})

    # Phase 1: ours against the peer, interleaved. Phases 2 and 3 run alone (four models with
    # their optimizer states at once would take about 7 GB on a machine shared by eight jobs).
    phase1: dict[str, nn.Module] = {"ferroquant QAT q4_0": qat.prepare(copy.deepcopy(base), "q4_0")}
    if not args.no_torchao:
        res["ppl"]["torchao ptq"] = ppl(torchao_ptq(copy.deepcopy(base)))
        phase1["torchao QAT"] = torchao_prepare(copy.deepcopy(base))
    run_phase(phase1)
    res["ppl"]["ferroquant QAT q4_0"] = ppl(qat.convert(phase1.pop("ferroquant QAT q4_0")))
    if "torchao QAT" in phase1:
        res["ppl"]["torchao QAT"] = ppl(torchao_convert(phase1.pop("torchao QAT")))
    del phase1
    print(f"ppl so far: {res['ppl']}", flush=True)

    phase2 = {"fine-tune + PTQ": copy.deepcopy(base)}
    run_phase(phase2)
    m = phase2.pop("fine-tune + PTQ")
    res["ppl"]["fine-tuned float"] = ppl(m)
    res["ppl"]["fine-tune + PTQ"] = ppl(fq.quantize_model(m, "q4_0", progress=False))
    del m
    print(f"ppl so far: {res['ppl']}", flush=True)

    phase3 = {"ternary QAT": qat.prepare(copy.deepcopy(base), "ternary")}
    run_phase(phase3)
    res["ppl"]["ternary QAT"] = ppl(qat.convert(phase3.pop("ternary QAT")))

    res["losses"] = {k: v.losses for k, v in logs.items()}
    res["median_step_s"] = {k: v.median_step_s for k, v in logs.items()}
    res["qlora"] = qlora_section(base, tok, cfg, args)
    res["total_s"] = time.perf_counter() - t0
    res["load_end"] = benchlib.load()

    p = res["ppl"]
    f, ptq = p["float"], p["ptq q4_0"]
    rows = [
        ["float (baseline)", f"{f:.3f}", "", "", ""],
        ["PTQ q4_0 (RTN)", f"{ptq:.3f}", "0 %", "", ""],
    ]
    step = res["median_step_s"]
    for name in ("fine-tune + PTQ", "ferroquant QAT q4_0"):
        rows.append(
            [
                name,
                f"{p[name]:.3f}",
                f"{100 * recovered(ptq, p[name], f):.0f} %",
                f"{step[name]:.2f}",
                "",
            ]
        )
    if "torchao QAT" in p:
        tp = p["torchao ptq"]
        rows.append(["torchao PTQ (int8 dyn act + int4 g32)", f"{tp:.3f}", "0 % (own)", "", ""])
        rows.append(
            [
                "torchao QAT",
                f"{p['torchao QAT']:.3f}",
                f"{100 * recovered(tp, p['torchao QAT'], f):.0f} % (own PTQ)",
                f"{step['torchao QAT']:.2f}",
                f"{step['ferroquant QAT q4_0'] / step['torchao QAT']:.2f}x",
            ]
        )
    rows.append(
        ["ternary QAT (absmean)", f"{p['ternary QAT']:.3f}", "", f"{step['ternary QAT']:.2f}", ""]
    )
    print()
    print(f"fine-tuned float (no quantization): {p['fine-tuned float']:.3f}")
    print("ternary QAT losses: " + " ".join(f"{v:.3f}" for v in res["losses"]["ternary QAT"]))
    print(
        benchlib.table(
            [
                "row",
                "ppl lee.cor",
                "PTQ gap recovered",
                "median s/step",
                "ours / torchao step time",
            ],
            rows,
        )
    )
    print(
        f"{res['config']}; {res['eval']}; total {res['total_s']:.0f} s; load at end "
        f"{res['load_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
