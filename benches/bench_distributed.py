"""HF -> GGUF on Ray vs the single-process convert, on the same cores.

    python benches/bench_distributed.py [--runs 3] [--layers 3] [--qtype q4_k_m]
        [--transfer shared-fs] [--checkpoint DIR]

Writes a random bf16 checkpoint of real Llama-3-8B layer shapes (hidden 4096, ffn 14336, 32
query / 8 kv heads; 218 M weights a layer, 3 layers = 1.3 GB, one shard a layer, an index file,
a small byte-fallback tokenizer, so the embedding is 286 rows) into a temporary folder, deleted
at the end (or kept in --checkpoint DIR and reused). Then, each driver in a fresh subprocess,
the engines interleaved over --runs runs (medians printed, with min-max):

  single   `hf_to_gguf` in one process (the Rust core on all cores);
  ray-1w   a local Ray cluster: a head without CPUs (the driver's node) and one worker node of
           2 CPUs (the machine's cores), tasks on 1 thread each (two worker processes);
  ray-1w-1cpu  the same head and one worker node of 1 CPU whose tasks run the core on 2
           threads (one worker process, both cores: the previous sessions' ray-1w);
  ray-2w   the same head and two worker nodes of 1 CPU, tasks on 1 thread each;
  ray-1w-direct, ray-2w-direct  ray-1w, ray-2w with write="workers": each task writes its
           bytes into the output file itself, nothing but crc32s travels back;
  ray-2w-ns  ray-2w without the resume side file;
  ray-local  one node of 2 CPUs that is also the driver's (Ray on one machine: the results
           need no copy from a worker node's object store to the driver's).

Every node is on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, no dashboard, no usage
stats). Each Ray driver first warms its workers up (the imports the single process makes
before its clock starts: torch, safetensors, ferroquant; Ray starts workers per job) and then
converts; the warm-up is printed apart. Printed: seconds, input GB/s (bf16 bytes read), the
ratio to single, the CPU seconds of every process involved (single: its own; Ray: the driver,
workers, raylets, GCS and object stores, so this column does not depend on what else the
shared machine runs) and their ratio, the driver's own CPU seconds, per-task overhead ((ray
time - single time) / tasks, and the round trip of an empty task), the driver's peak resident
memory (VmHWM, which includes object-store pages the driver maps to read results) beside the
largest tensor (float32) and the window, and whether the output bytes equal the
single-process file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import add_runs, interleave, load, machine, med, spread, table

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node registers as 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

HIDDEN, FFN, HEADS, KV_HEADS = 4096, 14336, 32, 8

CHILD = r"""
import json, os, sys, time
mode, src, out, qtype, address, transfer, threads, window, side_file, write = sys.argv[1:11]
import psutil, torch, safetensors, transformers  # imports before timing
me = psutil.Process()

def cpu(procs):
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:  # a process that ended meanwhile
            pass
    return out

result = {}
if mode == "single":
    from ferroquant.models.convert import hf_to_gguf
    c0, t0 = cpu([me]), time.perf_counter()
    hf_to_gguf(src, out, qtype)
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = cpu([me])[me.pid] - c0[me.pid]
else:
    import ray
    import ferroquant.distributed as fd
    from ferroquant.distributed import driver
    fd.connect(address)
    n_workers = int(ray.cluster_resources().get("CPU", 1))

    @ray.remote(num_cpus=1)
    def warm():  # what the single process imports before its clock starts
        import torch, safetensors, ferroquant.models.convert  # noqa: F401
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
    # the driver and every process of the local cluster (raylets, GCS, object stores, workers)
    procs = psutil.Process(os.getppid()).children(recursive=True)
    c0, t0 = cpu(procs), time.perf_counter()
    fd.convert(src, out, qtype, address=address, transfer=transfer, threads=int(threads),
               window_bytes=int(window), side_file=side_file == "1", write=write)
    result["seconds"] = time.perf_counter() - t0
    c1 = cpu(psutil.Process(os.getppid()).children(recursive=True))  # workers started since too
    result["cpu_seconds"] = sum(c1[p] - c0.get(p, 0.0) for p in c1)
    result["driver_cpu_seconds"] = c1[me.pid] - c0[me.pid]
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
          threads: int = 1, side_file: bool = True, write: str = "driver") -> dict:  # fmt: skip
    argv = [sys.executable, "-c", CHILD, mode, str(src), str(out), args.qtype, address,
            args.transfer, str(threads), str(args.window_mib << 20),
            str(int(side_file)), write]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ray_run(mode: str, workers: int, threads: int, src: Path, out: Path,
            args: argparse.Namespace, side_file: bool = True,
            head_cpus: int = 0, node_cpus: int = 1, write: str = "driver") -> dict:  # fmt: skip
    from ray.cluster_utils import Cluster

    store = args.store_mib << 20
    head = {"num_cpus": head_cpus, "include_dashboard": False, "object_store_memory": store}
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(workers):
            c.add_node(num_cpus=node_cpus, object_store_memory=store)
        return child(mode, src, out, args, c.address, threads, side_file, write)
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
    ap.add_argument("--checkpoint", default=None,
                    help="keep the checkpoint here (written when missing), reuse it")  # fmt: skip
    ap.add_argument(
        "--engines", default=None, help="comma-separated subset of the engines (single always runs)"
    )
    add_runs(ap, 3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fq-bench-dist-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        src = Path(args.checkpoint) if args.checkpoint else tmp / "llama3-shapes"
        if not (src / "model.safetensors.index.json").exists():
            write_checkpoint(src, args.layers)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        n_weights = size // 2
        print(f"checkpoint: {layers} Llama-3-8B layers, {n_weights / 1e9:.3f} B weights, "
              f"{size / 1e9:.3f} GB bf16, ready in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        print(machine())
        print(f"qtype {args.qtype}, transfer {args.transfer}, window {args.window_mib} MiB, "
              f"{args.runs} runs, engines interleaved")  # fmt: skip
        largest = FFN * HIDDEN * 4
        names = ("single", "ray-1w", "ray-1w-1cpu", "ray-2w", "ray-1w-direct", "ray-2w-direct",
                 "ray-2w-ns", "ray-local")  # fmt: skip
        outs = {n: tmp / f"{n}.gguf" for n in names}
        ref: list[str] = []

        def single() -> dict:
            r = child("single", src, outs["single"], args)
            ref.append(md5(outs["single"]))
            return r

        def ray(name: str, workers: int, threads: int, side_file: bool = True, head: int = 0,
                node_cpus: int = 1, write: str = "driver"):  # fmt: skip
            def run() -> dict:
                r = ray_run("ray", workers, threads, src, outs[name], args, side_file, head,
                            node_cpus, write)  # fmt: skip
                r["md5"] = md5(outs[name])
                return r

            return run

        engines = {
            "single": single,
            "ray-1w": ray("ray-1w", 1, 1, node_cpus=2),
            "ray-1w-1cpu": ray("ray-1w-1cpu", 1, 2),
            "ray-2w": ray("ray-2w", 2, 1),
            "ray-1w-direct": ray("ray-1w-direct", 1, 1, node_cpus=2, write="workers"),
            "ray-2w-direct": ray("ray-2w-direct", 2, 1, write="workers"),
            "ray-2w-ns": ray("ray-2w-ns", 2, 1, False),
            "ray-local": ray("ray-local", 0, 1, True, 2),
        }
        if args.engines:
            keep = {"single", *args.engines.split(",")}
            if keep - set(engines):
                raise SystemExit(f"unknown engines: {', '.join(sorted(keep - set(engines)))}")
            engines = {n: f for n, f in engines.items() if n in keep}
        rows = interleave(engines, args.runs)
        print(f"load average at the end: {load()}")
        base = med([r["seconds"] for r in rows["single"]])
        base_cpu = med([r["cpu_seconds"] for r in rows["single"]])
        head = ["run", "s", "GB/s in", "ratio", "CPU s", "CPU ratio", "driver CPU s",
                "tasks", "ovh/task ms", "empty ms", "warmup s", "peak MiB", "inflight MiB",
                "same"]  # fmt: skip
        table_rows = []
        for name, rs in rows.items():
            secs = [r["seconds"] for r in rs]
            s = med(secs)
            tasks = rs[0].get("tasks")
            ray_row = name != "single"
            table_rows.append([
                name, spread(secs, ".2f"), f"{size / s / 1e9:.3f}", f"{base / s:.2f}",
                spread([r["cpu_seconds"] for r in rs], ".2f"),
                f"{base_cpu / med([r['cpu_seconds'] for r in rs]):.2f}",
                f"{med([r['driver_cpu_seconds'] for r in rs]):.2f}" if ray_row else "-",
                tasks or "-", f"{(s - base) / tasks * 1e3:.1f}" if tasks else "-",
                f"{med([r['empty_task_ms'] for r in rs]):.2f}" if ray_row else "-",
                f"{med([r['warmup_seconds'] for r in rs]):.1f}" if ray_row else "-",
                f"{max(r['peak_rss_mib'] for r in rs):.0f}",
                f"{max(r['peak_in_flight'] for r in rs) / 2**20:.0f}" if ray_row else "-",
                str(all(r["md5"] == ref[0] for r in rs)) if ray_row else "-",
            ])  # fmt: skip
        print(table(head, table_rows))
        print("s: median (min-max) of the runs; ratio: single's median s / the row's; CPU s: "
              "CPU seconds of every process involved (Ray: driver, workers, raylets, GCS); "
              "CPU ratio: single's / the row's; ray-2w-ns: ray-2w without the resume side "
              "file; ray-local: one node of 2 CPUs, the driver's own (no transfer between "
              "object stores); peak MiB: the driver's largest VmHWM over the runs")  # fmt: skip
        print(f"largest tensor (float32): {largest / 2**20:.0f} MiB; driver memory target: "
              f"2 x largest + window = {(2 * largest >> 20) + args.window_mib} MiB")  # fmt: skip
        print(f"single-process outputs identical across runs: {len(set(ref)) == 1}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
