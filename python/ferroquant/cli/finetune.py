"""`ferroquant finetune`: fine-tune a model on the CPU, with the quantization in the loop (--qat)
or plainly and quantized afterwards, then score it on held-out text and write it."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model (QAT with --qat Q, else plain) and write it quantized",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a Hugging Face checkpoint folder or a .gguf file (default: the shipped "
        "SmolLM2-135M-Instruct GGUF, loaded as a float model)",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        type=Path,
        help="the file to write: .gguf or .safetensors (ferroquant's layout)",
    )
    p.add_argument(
        "--qat",
        metavar="Q",
        help="train with the quantization in the loop: a qtype (q4_0, nf4, ...), a "
        "llama.cpp mix (q4_k_m, ...) or 'ternary' (BitNet b1.58 absmean)",
    )
    p.add_argument(
        "--qtype",
        metavar="Q",
        help="without --qat: the qtype or mix to quantize to after training (default q4_0)",
    )
    p.add_argument("--text", help="training text (default: gensim's lee_background.cor)")
    p.add_argument("--eval-text", help="held-out text (default: gensim's lee.cor)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (0: all)")
    p.add_argument(
        "--lora",
        metavar="SPEC",
        help="r=16[,alpha=32][,dropout=0.05][,targets=q_proj,v_proj]: train LoRA "
        "adapters over the quantized base (QLoRA; the base is --qtype, default nf4), then "
        "merge them and quantize again",
    )
    p.add_argument(
        "--merge-qtype",
        metavar="Q",
        help="with --lora: the qtype of the merged weights (default: the base's; a .gguf "
        "output of an nf4/fp4/int8/fp8 base needs a ggml qtype such as q4_0)",
    )
    p.add_argument(
        "--ternary-format",
        choices=("tq1_0", "tq2_0"),
        default="tq2_0",
        help="with --qat ternary: ggml's ternary format the trained weights are stored in "
        "(rows not a multiple of 256 go to q8_0, which holds them exactly)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import FinetuneArgs
    from ..train.finetune import run as finetune

    finetune(
        FinetuneArgs(
            model=args.model,
            out=args.out,
            text=args.text,
            qat=args.qat,
            qtype=args.qtype,
            steps=args.steps,
            lr=args.lr,
            seq_len=args.seq_len,
            batch=args.batch,
            eval_text=args.eval_text,
            eval_tokens=args.eval_tokens,
            lora=args.lora,
            ternary_format=args.ternary_format,
            merge_qtype=args.merge_qtype,
        ),
        say=lambda s: print(s, flush=True),
    )
    return 0
