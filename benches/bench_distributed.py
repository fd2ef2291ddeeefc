"""HF -> GGUF on Ray vs the single-process convert, on the same cores.

    python benches/bench_distributed.py [--layers 3] [--qtype q4_k_m] [--transfer shared-fs]

Writes a random bf16 checkpoint of real Llama-3-8B layer shapes (hidden 4096, ffn 14336, 32
query / 8 kv heads; 218 M weights a layer, 3 layers = 1.3 GB, one shard a layer, an index file,
a small byte-fallback tokenizer, so the embedding is 286 rows) into a temporary folder, deleted
at the end. Then, each driver in a fresh subprocess:

  single   `hf_to_gguf` in one process (the Rust core on all cores);
  ray-1w   a local Ray cluster: a head without CPUs (the driver's node) and one worker node of
           1 CPU whose tasks run the core on 2 threads (one worker process, both cores);
  ray-2w   the same head and two worker nodes of 1 CPU, tasks on 1 thread each;
  ray-2w-ns  ray-2w without the resume side file (every byte written once).

Every node is on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, no dashboard, no usage
stats). Each Ray driver first warms its workers up (imports, one task per worker; Ray starts
workers per job) and then converts; the warm-up is printed apart. Printed: seconds, input GB/s
(bf16 bytes read), weights/s, the ratio to single, per-task overhead ((ray time - single time) /
tasks, and the round trip of an empty task), the driver's peak resident memory (ru_maxrss,
which includes object-store pages the driver maps to read results) beside the largest tensor
(float32) and the window, and whether the output bytes equal the single-process file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node registers as 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

HIDDEN, FFN, HEADS, KV_HEADS = 4096, 14336, 32, 8

CHILD = r"""
import json, os, sys, time
mode, src, out, qtype, address, transfer, threads, window, side_file = sys.argv[1:10]
import torch, safetensors, transformers  # imports before timing
result = {}
if mode == "single":
    from ferroquant.models.convert import hf_to_gguf
    t0 = time.perf_counter()
    hf_to_gguf(src, out, qtype)
    result["seconds"] = time.perf_counter() - t0
else:
    import ray
    import ferroquant.distributed as fd
    from ferroquant.distributed import driver
    fd.connect(address)
    n_workers = int(ray.cluster_resources().get("CPU", 1))

    @ray.remote(num_cpus=1)
    def warm():
        import ferroquant.models.convert  # noqa: F401 (torch, safetensors, the core)
        return os.getpid()

    @ray.remote(num_cpus=1)
    def empty(x):
        return x

    t0 = time.perf_counter()
    ray.get([warm.remote() for _ in range(4 * n_workers)])
    result["warmup_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.get([empty.remote(i) for i in range(200)])
    result["empty_task_ms"] = (time.perf_counter() - t0) / 200 * 1e3
    runs = []
    class Spy(driver._Run):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runs.append(self)
    driver._Run = Spy
    t0 = time.perf_counter()
    fd.convert(src, out, qtype, address=address, transfer=transfer, threads=int(threads),
               window_bytes=int(window), side_file=side_file == "1")
    result["seconds"] = time.perf_counter() - t0
    result["tasks"] = sum(len(ts) for ts in runs[0].tasks)
    result["peak_in_flight"] = runs[0].peak_in_flight
with open("/proc/self/status") as f:  # VmHWM: this process's peak (ru_maxrss is inherited)
    result["peak_rss_mib"] = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps(result))
"""


def write_checkpoint(out: Path, layers: int) -> int:
    """The synthetic checkpoint; its size in bytes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_distributed import write_tokenizer

    out.mkdir(parents=True)
    vocab = write_tokenizer(out)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

    kv = HIDDEN * KV_HEADS // HEADS
    weight_map: dict[str, str] = {}
    n = layers + 1
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < layers:
            p = f"model.layers.{i}."
            ts = {
                p + "self_attn.q_proj.weight": r(HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": r(kv, HIDDEN),
                p + "self_attn.v_proj.weight": r(kv, HIDDEN),
                p + "self_attn.o_proj.weight": r(HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": r(FFN, HIDDEN),
                p + "mlp.up_proj.weight": r(FFN, HIDDEN),
                p + "mlp.down_proj.weight": r(HIDDEN, FFN),
                p + "input_layernorm.weight": r(HIDDEN),
                p + "post_attention_layernorm.weight": r(HIDDEN),
            }
        else:
            ts = {
                "model.embed_tokens.weight": r(vocab, HIDDEN),
                "model.norm.weight": r(HIDDEN),
                "lm_head.weight": r(vocab, HIDDEN),
            }
        save_file(ts, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(ts, shard)
        del ts
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def child(mode: str, src: Path, out: Path, args: argparse.Namespace, address: str = "",
          threads: int = 1, side_file: bool = True) -> dict:  # fmt: skip
    argv = [sys.executable, "-c", CHILD, mode, str(src), str(out), args.qtype, address,
            args.transfer, str(threads), str(args.window_mib << 20),
            str(int(side_file))]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ray_run(mode: str, workers: int, threads: int, src: Path, out: Path,
            args: argparse.Namespace, side_file: bool = True) -> dict:  # fmt: skip
    from ray.cluster_utils import Cluster

    store = args.store_mib << 20
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": store})  # fmt: skip
    try:
        for _ in range(workers):
            c.add_node(num_cpus=1, object_store_memory=store)
        return child(mode, src, out, args, c.address, threads, side_file)
    finally:
        c.shutdown()


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--qtype", default="q4_k_m")
    ap.add_argument("--transfer", default="shared-fs", choices=["shared-fs", "object-store"])
    ap.add_argument("--window-mib", type=int, default=512)
    ap.add_argument("--store-mib", type=int, default=1024, help="object store of each node")
    ap.add_argument("--tmp", default=None, help="folder for the checkpoint (default: system)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fq-bench-dist-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        src = tmp / "llama3-shapes"
        size = write_checkpoint(src, args.layers)
        n_weights = size // 2
        print(f"checkpoint: {args.layers} Llama-3-8B layers, {n_weights / 1e9:.3f} B weights, "
              f"{size / 1e9:.3f} GB bf16, written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; qtype {args.qtype}, "
              f"transfer {args.transfer}, window {args.window_mib} MiB")  # fmt: skip
        largest = FFN * HIDDEN * 4
        rows = {}
        rows["single"] = child("single", src, tmp / "single.gguf", args)
        ref = md5(tmp / "single.gguf")
        rows["ray-1w"] = ray_run("ray", 1, 2, src, tmp / "ray1.gguf", args)
        rows["ray-1w"]["same"] = md5(tmp / "ray1.gguf") == ref
        rows["ray-2w"] = ray_run("ray", 2, 1, src, tmp / "ray2.gguf", args)
        rows["ray-2w"]["same"] = md5(tmp / "ray2.gguf") == ref
        rows["ray-2w-ns"] = ray_run("ray", 2, 1, src, tmp / "ray2ns.gguf", args, False)
        rows["ray-2w-ns"]["same"] = md5(tmp / "ray2ns.gguf") == ref
        base = rows["single"]["seconds"]
        print(f"{'run':<9} {'s':>7} {'GB/s in':>8} {'Mw/s':>7} {'ratio':>6} {'tasks':>6} "
              f"{'ovh/task ms':>11} {'empty ms':>8} {'warmup s':>8} {'peak MiB':>9} "
              f"{'inflight MiB':>12} {'same':>5}")  # fmt: skip
        for name, r in rows.items():
            s = r["seconds"]
            tasks = r.get("tasks")
            ovh = f"{(s - base) / tasks * 1e3:.2f}" if tasks else "-"
            empty = f"{r['empty_task_ms']:.2f}" if "empty_task_ms" in r else "-"
            warm = f"{r['warmup_seconds']:.1f}" if "warmup_seconds" in r else "-"
            infl = f"{r['peak_in_flight'] / 2**20:.0f}" if "peak_in_flight" in r else "-"
            print(f"{name:<9} {s:7.2f} {size / s / 1e9:8.3f} {n_weights / s / 1e6:7.1f} "
                  f"{base / s:6.2f} {tasks or '-':>6} {ovh:>11} {empty:>8} {warm:>8} "
                  f"{r['peak_rss_mib']:9.0f} {infl:>12} {str(r.get('same', '-')):>5}")  # fmt: skip
        print("ray-2w-ns: ray-2w without the resume side file (side_file=False)")
        print(f"largest tensor (float32): {largest / 2**20:.0f} MiB; driver memory target: "
              f"2 x largest + window = {(2 * largest >> 20) + args.window_mib} MiB")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
