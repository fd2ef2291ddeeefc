"""Our grouped-int4 CPU kernel against GPTQModel's own CPU kernel, on the same GPTQ checkpoint.

A one-layer random Llama with Llama-3-8B's MLP shapes (hidden 4096, ffn 14336) is written as a
GPTQ checkpoint (`ferroquant convert --format gptq`, 4-bit, group 64 or --group-size); both
engines load that folder: ours with `ferroquant.load_quantized` (QuantLinear over the packed
codes), GPTQModel with `GPTQModel.load(..., dtype=bfloat16)`, which picks its CPU kernel
(TorchCpuAvx512Linear where the CPU has AVX-512 BF16). Each row times one Linear's forward on
bf16 activations of M rows, engines interleaved, the median of --runs runs of --reps calls each.
The weights (29 MB a matrix) stay in the last-level cache for both engines alike.

    GPTQMODEL_CPU_WORKERS=2 python benches/bench_gint.py [--runs 5] [--reps 20] [--group-size 64]

On a loaded machine wall clock favours whichever engine's threads are scheduled more:
`--threads 1 --cpu-time` times both engines on one thread by the process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from benchlib import add_runs, interleave, machine, ratio, spread, table  # noqa: E402

import ferroquant as fq  # noqa: E402


def _model(path: Path, hidden: int, ffn: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", bos_token="t1",
                            eos_token="t2", pad_token="t3").save_pretrained(path)  # fmt: skip
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_runs(ap, 5)
    ap.add_argument("--reps", type=int, default=20, help="forward calls per timing")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines")
    ap.add_argument("--cpu-time", action="store_true",
                    help="the process's CPU time, not wall clock (with --threads 1)")  # fmt: skip
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="keep the GPTQ checkpoint in this folder, reuse it if there")  # fmt: skip
    args = ap.parse_args()
    from gptqmodel import GPTQModel

    from ferroquant.models.ecosystem import convert_to_checkpoint

    torch.set_num_threads(args.threads)
    fq.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        src, ckpt = Path(tmp) / "float", Path(tmp) / "gptq"
        if args.ckpt is not None:
            ckpt = args.ckpt / f"gptq_{args.hidden}_{args.ffn}_g{args.group_size}"
        if not (ckpt / "config.json").exists():
            _model(src, args.hidden, args.ffn)
            convert_to_checkpoint(src, ckpt, "gptq", bits=4, group_size=args.group_size,
                                  progress=False)  # fmt: skip
        ours = fq.load_quantized(ckpt)
        peer = GPTQModel.load(str(ckpt), device="cpu", dtype=torch.bfloat16).model
    rows = []
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"):
        a, b = ours.get_submodule(name), peer.get_submodule(name)
        kernel = type(b).__name__
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, a.in_features, generator=torch.Generator().manual_seed(m))
            x = x.to(torch.bfloat16)

            def timed(mod: torch.nn.Module, x: torch.Tensor = x) -> float:
                with torch.no_grad():
                    mod(x)
                    t0 = clock()
                    for _ in range(args.reps):
                        mod(x)
                return (clock() - t0) / args.reps * 1e6

            res = interleave({"ours": lambda a=a: timed(a), "peer": lambda b=b: timed(b)},
                             args.runs)  # fmt: skip
            shape = f"{a.in_features}x{a.out_features}"
            rows.append([shape, m, spread(res["ours"]), f"{kernel}: {spread(res['peer'])}",
                         ratio(res["ours"], res["peer"], higher_is_better=False)])  # fmt: skip
            print(rows[-1], flush=True)
    print()
    print(machine())
    what = f"{args.runs} runs x {args.reps} calls, median (min-max) us a call"
    how = f"{args.threads} threads, {'CPU time' if args.cpu_time else 'wall clock'}"
    print(f"int4 g{args.group_size} sym (GPTQ checkpoint), bf16 activations, {how}; {what}")
    print(table(["K x N", "M", "ours us", "GPTQModel us", "ours faster"], rows))


if __name__ == "__main__":
    main()
