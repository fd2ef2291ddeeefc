"""One GGUF file's perplexity on the held-out text in ferroquant and in llama.cpp, side by side.

Issue 13's check that llama.cpp runs a GPTQ GGUF written by `ferroquant convert ... --method gptq`
and agrees with us: both engines read the same file's bytes (ours: `fq.load_gguf_model`, the
quantized weights kept as they are, QuantLinear on our kernels, float32 activations; llama.cpp:
llama-cpp-python), on the same token ids and `ferroquant eval`'s windows (ctx 512, stride 512,
2048 scored tokens of gensim's lee.cor by default). Perplexity, and the mean KL of llama.cpp's
next-token distribution from ours.

    python benches/gguf_llamacpp_ppl.py FILE.gguf [--ctx 512] [--max-tokens 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch

import ferroquant as fq
from ferroquant.eval.llamacpp import _score
from ferroquant.eval.load import read_text, tokenize
from ferroquant.eval.metrics import Scores, make_windows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
    text, what = read_text(None)
    ids = tokenize(tok, text)
    windows = make_windows(int(ids.numel()), args.ctx, args.ctx, args.max_tokens)

    model = fq.load_gguf_model(args.gguf)
    ours_logits = []
    ours = Scores()
    with torch.no_grad():
        for w in windows:
            lo = model(ids[None, w.start : w.end]).logits[0].float()
            a, z = w.first - w.start - 1, w.end - w.start - 1  # as eval/run.py slices
            ours_logits.append(lo[a:z])
            ours.add(lo[a:z], lo[a:z], ids[w.first : w.end])
    del model

    ctx = max(w.end - w.start for w in windows)
    llm = llama_cpp.Llama(model_path=str(args.gguf), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                          logits_all=True, n_threads=args.threads, verbose=False)  # fmt: skip
    try:
        _, theirs = _score(llm, [int(i) for i in ids], windows, ours_logits)
    finally:
        if hasattr(llm, "close"):
            llm.close()

    load = os.getloadavg()
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; llama-cpp-python "
          f"{llama_cpp.__version__}")  # fmt: skip
    print(f"file: {args.gguf}; text: {what}; ctx {args.ctx}, stride {args.ctx}, {ours.n} tokens")
    print("| engine | ppl | mean KL from ours | top-1 agreement with ours |")
    print("|---|---|---|---|")
    print(f"| ferroquant (load_gguf_model) | {ours.ppl():.3f} | - | - |")
    print(f"| llama.cpp | {theirs.ppl():.3f} | {theirs.mean_kl():.5f} | {theirs.top1_rate():.3f} |")
    print(f"llama.cpp / ours perplexity: {100 * (theirs.ppl() / ours.ppl() - 1):+.2f} %")


if __name__ == "__main__":
    main()
