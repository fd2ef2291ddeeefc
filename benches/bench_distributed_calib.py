"""GPTQ on a local Ray cluster vs on one machine, same cores, same bytes.

    python benches/bench_distributed_calib.py [--qtype q4_k_m] [--calib-samples 8]
        [--calib-len 256] [--layers 0] [--runs 1]

The default model (SmolLM2-135M-Instruct, its GGUF's weights dequantized and held in bf16, as
`ferroquant eval` loads it; `--layers N` keeps its first N decoder layers, 0 all), calibrated on
the first samples x len tokens of lee_background.cor. Two engines, interleaved run by run:

  single   `ferroquant.quantize_model(method="gptq")` in this process (torch on all cores for
           the layers' forward passes, one thread per GPTQ solve, as always);
  ray-2w   `ferroquant.distributed.quantize_model` on a local cluster started here: a head
           without CPUs (this driver's node) and two worker nodes of 1 CPU on 127.0.0.1
           (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, no dashboard, no usage stats); the statistics
           and outputs per shard of 8 windows, the solves, as tasks.

The cluster starts before the runs and its workers are warmed up (imports, one task each);
both are printed apart. Printed: seconds per engine (median and range), the ratio, and whether
every QuantLinear's bytes equal the single machine's.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node registers as 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def _warm(ray) -> None:
    def imports() -> int:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import ferroquant.distributed.calib_tasks  # noqa: F401

        return os.getpid()

    f = ray.remote(imports).options(num_cpus=1)
    ray.get([f.remote() for _ in range(4)])


def _qbytes(model) -> dict[str, bytes]:
    import numpy as np

    from ferroquant.nn import QuantLinear

    return {
        n: np.asarray(m.qtensor().data).tobytes()
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qtype", default="q4_k_m")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    benchlib.add_runs(ap, 1)
    args = ap.parse_args()

    import ray
    import torch
    from ray.cluster_utils import Cluster

    import ferroquant as fq
    import ferroquant.distributed as fd
    from ferroquant.calib import calibration_ids
    from ferroquant.eval.load import load_model

    print(f"machine: {benchlib.machine()}")
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    if args.layers:
        del model.model.layers[args.layers :]
        model.config.num_hidden_layers = args.layers
    n_layers = len(model.model.layers)
    ids = calibration_ids(None, tok, args.calib_samples, args.calib_len)
    cfg = {"n_samples": args.calib_samples, "seq_len": args.calib_len}
    print(f"model: {loaded.source}, {n_layers} layers; {args.qtype}; gptq on "
          f"{ids.shape[0]} x {ids.shape[1]} tokens of lee_background.cor; torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip

    t0 = time.perf_counter()
    store = 200 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": store})  # fmt: skip
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False)
    t1 = time.perf_counter()
    _warm(ray)
    t2 = time.perf_counter()
    print(f"cluster start {t1 - t0:.1f} s, worker warm-up {t2 - t1:.1f} s (not in the times)")

    results: dict[str, dict[str, bytes]] = {}

    def engine(name: str, run) -> callable:
        def timed() -> float:
            m = copy.deepcopy(model)
            s = time.perf_counter()
            run(m)
            took = time.perf_counter() - s
            results[name] = _qbytes(m)
            print(f"  {name}: {took:.1f} s (load {benchlib.load()})", flush=True)
            return took

        return timed

    try:
        times = benchlib.interleave(
            {
                "single": engine(
                    "single",
                    lambda m: fq.quantize_model(
                        m, args.qtype, method="gptq", calibration=ids, config=cfg, progress=False
                    ),
                ),
                "ray-2w": engine(
                    "ray-2w",
                    lambda m: fd.quantize_model(
                        m, args.qtype, method="gptq", calibration=ids, config=cfg, progress=False
                    ),
                ),
            },  # fmt: skip
            args.runs,
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    same = results["single"] == results["ray-2w"]
    rows = [
        ["single", benchlib.spread(times["single"]), "1.00x", "-"],
        ["ray-2w", benchlib.spread(times["ray-2w"]),
         benchlib.ratio(times["ray-2w"], times["single"], higher_is_better=False), same],
    ]  # fmt: skip
    print(benchlib.table(["engine", "seconds", "speed vs single", "same bytes"], rows))
    print(f"{len(results['single'])} QuantLinears; load average at the end {benchlib.load()}")


if __name__ == "__main__":
    main()
