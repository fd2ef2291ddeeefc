"""Calibrated methods on a Ray cluster: GPTQ, AWQ and awq+gptq layer by layer, and importance
matrices.

    import ferroquant.distributed as fd
    fd.quantize_model(model, "q4_k_m", method="gptq", calibration=ids, address="auto")
    fd.convert("Llama-3-8B/", "llama3.q4_k_m.gguf", "q4_k_m", method="gptq", address="auto")
    im = fd.compute_imatrix(model, ids, names, address="auto")

The same bytes as on one machine. The calibration windows are cut into fixed shards of
`calib.capture.SHARD_WINDOWS` windows, whatever the number of workers; the single-machine capture
sums its statistics in the same shards. For each decoder layer:

1. one task per shard computes the float64 sums of x^T x of the layer's Linears over its windows
   (`calib_tasks.layer_stats`); the driver adds the shards' sums in shard order;
2. the layer's GPTQ solves (one per group of Linears sharing an input and a qtype) are tasks;
3. one task per shard computes the quantized layer's outputs, which stay in Ray's object store
   as the next layer's inputs (the driver holds references only).

AWQ's searches (between 1 and 2, per pair in turn) are per-window results computed by one task
per shard (`calib.LocalWindows.map` on one machine, `RayWindows.map` here) and added in window
order on the driver: x_mean's float64 sums of |x|, each candidate scale's squared output error
(the candidates' weights shipped once per pair), the clip search's strided input rows.

The driver holds the model (it runs the embeddings and sets each layer's quantized weights); the
workers receive one layer at a time. Importance matrices run the whole float model per task on
shards of chunks and add each chunk's contributions in chunk order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._extras import require
from . import calib_tasks
from .driver import ClusterError, connect
from .driver import convert as convert_rtn
from .layer_journal import LayerJournal, ids_fingerprint, layers_path

IMATRIX_SHARD_CHUNKS = 4  # chunks per importance-matrix task (any value gives the same bits)
METHODS = ("gptq", "awq", "awq+gptq")  # the calibrated methods the cluster runs


class RayRunner:
    """`methods.layerwise.LocalRunner`'s interface on a Ray cluster (one CPU per task)."""

    def __init__(
        self,
        ray: Any,
        num_cpus: float = 1,
        max_retries: int = 3,
        journal: LayerJournal | None = None,
        fingerprint: str = "",
    ) -> None:
        """`journal`: the side folder that keeps each finished layer and the next inputs (and,
        resuming, gives back those of an interrupted run); `fingerprint`: what identifies the
        run besides the calibration tokens (checkpoint, plan, method, settings)."""
        self.ray = ray
        self.journal, self.fingerprint = journal, fingerprint
        opts = {"num_cpus": num_cpus, "max_retries": max_retries, "retry_exceptions": False}
        self.stats_task = ray.remote(calib_tasks.layer_stats).options(**opts)
        self.outputs_task = ray.remote(calib_tasks.layer_outputs).options(**opts)
        self.solve_task = ray.remote(calib_tasks.gptq_solve).options(**opts)
        self.map_task = ray.remote(calib_tasks.window_map).options(**opts)
        self.pair_task = ray.remote(calib_tasks.pair_map).options(**opts)
        self.max_retries = max_retries
        self.inputs: list[Any] = []

    def get(self, refs: list[Any], what: str) -> list[Any]:
        """ray.get, a task's own error raised as the ValueError it was, Ray's as ClusterError."""
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            msg = str(cause) if cause is not None else str(e).strip().splitlines()[-1]
            raise ValueError(msg) from None
        except ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ClusterError(
                f"Ray could not run the tasks for {what} (after up to {self.max_retries} "
                f"retries): {type(e).__name__}: {first}"
            ) from None

    def run_layers(
        self,
        model: Any,
        ids: Any,
        process: Callable[..., Callable[[], None] | None],
        *,
        progress: bool = True,
        desc: str = "calibrate",
        carry: Any = None,
    ) -> None:
        """`calib.run_layers` with the statistics and the outputs computed by tasks per shard.
        `carry`: a second stream of the windows the method moves on itself (its `.hidden`: shard
        references, None while it is the quantized model's, e.g. GPTQ's float stream), journaled
        with each layer and given back on resume."""
        import torch

        from ..calib.capture import SHARD_WINDOWS, InputStats, find_decoder_layers
        from ..calib.capture import first_layer_inputs as first_inputs

        ray = self.ray
        prefix, layers = find_decoder_layers(model)
        journal = self.journal
        with torch.no_grad():
            hidden, calls = first_inputs(model, layers, ids)
            start = 0
            if journal is not None:
                start = journal.open(ids_fingerprint(self.fingerprint, ids, len(layers)))
                if start:  # the finished layers as they were left, and the next one's inputs
                    for i in range(start):
                        layers[i] = journal.layer(i)
                    hidden = journal.inputs()
            tokens = [int(h.shape[-2]) for h in hidden]
            step = SHARD_WINDOWS
            shards = [ray.put(hidden[k : k + step]) for k in range(0, len(hidden), step)]
            if carry is not None and journal is not None and start:
                fl = journal.float_inputs()
                carry.hidden = [ray.put(fl[k : k + step]) for k in range(0, len(fl), step)]
            self.inputs = shards  # the current layer's input shards (for inspection)
            del hidden
            bar = _bar(progress, len(layers), f"{desc} (ray, {len(shards)} shards)")
            if bar is not None and start:
                bar.update(start)
            for i, layer in enumerate(layers):
                if i < start:
                    continue
                where = f"{prefix}.{i}"
                dtypes = {p.dtype for p in layer.parameters()}
                dtype = dtypes.pop() if len(dtypes) == 1 else None
                layer.to(torch.float32)
                call = ray.put(calls[i])
                floats = ray.put(layer)
                parts = self.get(
                    [self.stats_task.remote(floats, call, s, where) for s in shards], where
                )
                del floats
                stats = InputStats(layer, where)
                stats.remove()
                for sums, counts, group_of, abs_sums in parts:  # in shard order
                    stats.add_shard(sums, counts, group_of, abs_sums)
                del parts
                stats.windows = RayWindows(self, shards, call, tokens, where)
                finish = process(i, where, layer, stats)
                del stats
                quantized = ray.put(layer)
                shards = [self.outputs_task.remote(quantized, call, s, where) for s in shards]
                self.inputs = shards
                if i == len(layers) - 1:  # nobody reads them: surface their errors here
                    self.get(shards, where)
                del quantized
                if finish is not None:
                    finish()
                if dtype is not None:
                    layer.to(dtype)
                if journal is not None:  # the last layer's outputs are nobody's inputs
                    last = i == len(layers) - 1
                    nxt = [] if last else [h for part in self.get(shards, where) for h in part]
                    fl = None
                    if carry is not None and not last and carry.hidden is not None:
                        fl = [h for part in self.get(carry.hidden, where) for h in part]
                    journal.save(i, layer, nxt, fl)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()

    def solve(self, jobs: list[Any]) -> list[Any]:
        """The layer's GPTQ solves as tasks (each Hessian shipped once), results in job order."""
        import dataclasses

        hessians: dict[int, Any] = {}
        refs = []
        for job in jobs:
            key = id(job.hessian)
            if key not in hessians:
                hessians[key] = self.ray.put(job.hessian)
            light = dataclasses.replace(job, hessian=None)
            refs.append(self.solve_task.remote(light, hessians[key]))
        return self.get(refs, ", ".join(j.name for j in jobs))


class RayWindows:
    """`calib.LocalWindows` on the cluster: `map(layer, fn, *args)` runs `fn` per shard as a task
    (the layer as it is now, large arguments shipped once) and concatenates the per-window
    results in shard order."""

    def __init__(self, runner: RayRunner, shards: list[Any], call: Any, tokens: list[int],
                 where: str) -> None:  # fmt: skip
        self.runner, self.shards, self.call, self.where = runner, shards, call, where
        self.tokens = tokens
        self.count = len(tokens)

    def map(self, layer: Any, fn: Callable[..., list], *args: Any) -> list:
        from ..calib.capture import SHARD_WINDOWS

        ray = self.runner.ray
        layer_ref = ray.put(layer)
        refs = [ray.put(a) if _large(a) else a for a in args]
        tasks = [
            self.runner.map_task.remote(fn, layer_ref, self.call, s, k * SHARD_WINDOWS, *refs)
            for k, s in enumerate(self.shards)
        ]
        out: list = []
        for part in self.runner.get(tasks, self.where):
            out.extend(part)
        return out

    @property
    def stream(self) -> list[Any]:
        """The windows' hidden states as a stream: the current layer's input shards."""
        return self.shards

    def map_pair(self, layer: Any, other: Any, other_stream: list[Any] | None,
                 fn: Callable[..., list], *args: Any) -> list:  # fmt: skip
        """`calib.LocalWindows.map_pair` per shard: one task a shard, its shard of
        `other_stream` next to it; the per-shard results in shard order."""
        ray = self.runner.ray
        layer_ref = ray.put(layer)
        other_ref = ray.put(other) if other is not None else None
        others = other_stream if other_stream is not None else [None] * len(self.shards)
        if len(others) != len(self.shards):
            raise ValueError(f"{self.where}: the two streams have different shards")
        tasks = [
            self.runner.pair_task.remote(fn, layer_ref, other_ref, self.call, s, o, *args)
            for s, o in zip(self.shards, others, strict=True)
        ]
        out: list = []
        for part in self.runner.get(tasks, self.where):
            out.extend(part)
        return out

    def outputs(self, layer: Any, stream: list[Any], where: str) -> list[Any]:
        """`layer`'s outputs on `stream` as a stream: one task a shard, the results left in the
        object store (their errors surface where they are read)."""
        layer_ref = self.runner.ray.put(layer)
        return [self.runner.outputs_task.remote(layer_ref, self.call, s, where) for s in stream]


def _large(a: Any) -> bool:
    """Worth one object-store copy rather than one per task (lists of tensors: AWQ's candidates)."""
    return isinstance(a, (list, tuple)) and any(not isinstance(x, (str, int, float)) for x in a)


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="layer")


def _connected(address: str | None, timeout: float) -> tuple[Any, bool]:
    ray = require("ray", "ferroquant.distributed", "distributed")
    return ray, connect(address, timeout)


def quantize_model(
    model: Any,
    recipe: Any = "q4_k_m",
    *,
    method: str = "gptq",
    address: str | None = None,
    connect_timeout: float = 30.0,
    num_cpus: float = 1,
    max_retries: int = 3,
    **kwargs: Any,
) -> Any:
    """`ferroquant.quantize_model(model, recipe, method=..., ...)` for a calibrated method (gptq,
    awq, awq+gptq) with the layers' statistics, searches, solves and outputs computed on the Ray
    cluster at `address` (auto, HOST:PORT; connected here unless this process already is). Same
    bytes as on one machine. `kwargs`: quantize_model's (calibration, tokenizer, config, skip,
    filter_fn, progress, ...)."""
    from ..models.quantize import quantize_model as quantize_here

    key = str(method).lower()
    if key not in METHODS:
        raise ValueError(
            f"method {method!r} runs on one machine (ferroquant.quantize_model); the cluster "
            f"runs {', '.join(METHODS)}"
        )
    ray, connected = _connected(address, connect_timeout)
    try:
        runner = RayRunner(ray, num_cpus, max_retries)
        return quantize_here(model, recipe, method=key, runner=runner, **kwargs)
    finally:
        if connected:
            ray.shutdown()


def compute_imatrix(
    model: Any,
    ids: Any,
    names: dict[str, str],
    *,
    process_output: bool = False,
    dataset: str = "",
    progress: Callable[[int, int], None] | None = None,
    address: str | None = None,
    connect_timeout: float = 30.0,
    shard_chunks: int = IMATRIX_SHARD_CHUNKS,
    num_cpus: float = 1,
    max_retries: int = 3,
) -> Any:
    """`methods.imatrix.compute_imatrix` on the Ray cluster at `address`: tasks of `shard_chunks`
    chunks each run the float model (shipped once through the object store) and return every
    chunk's contributions, which the driver adds in chunk order. Same values as on one machine."""
    from ..methods.imatrix import ImatrixSums

    if shard_chunks < 1:
        raise ValueError(f"shard_chunks must be at least 1, got {shard_chunks}")
    ray, connected = _connected(address, connect_timeout)
    try:
        runner = RayRunner(ray, num_cpus, max_retries)
        task = ray.remote(calib_tasks.imatrix_shard).options(
            num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False
        )
        model_ref = ray.put(model)
        n = int(ids.shape[0])
        refs = [
            task.remote(model_ref, ids[k : k + shard_chunks], names, process_output)
            for k in range(0, n, shard_chunks)
        ]
        total, done = ImatrixSums(), 0
        for ref in refs:  # in chunk order, each as soon as it is there
            (chunks,) = runner.get([ref], "the importance matrix")
            for events in chunks:
                total.add(events)
                done += 1
                if progress is not None:
                    progress(done, n)
        return total.result(tuple(ids.shape), dataset)
    finally:
        if connected:
            ray.shutdown()


def convert(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "f16",
    *,
    method: str = "rtn",
    calibration: str | os.PathLike[str] | None = None,
    n_samples: int | None = None,
    seq_len: int | None = None,
    config: Any = None,
    address: str | None = None,
    progress: bool = False,
    connect_timeout: float = 30.0,
    resume: bool = False,
    side_file: bool = True,
    **options: Any,
) -> dict[str, str]:
    """`ferroquant.distributed.driver.convert` (method "rtn": `options` are its own: transfer,
    window_bytes, resume, ...), or, method gptq / awq / awq+gptq, `ferroquant convert --method`
    on the cluster: the method layer by layer on the Ray cluster (`calibration`: a text file,
    None: the default text; `n_samples` x `seq_len` windows, default the method's config), then
    the driver writes the GGUF file (atomically) as `hf_to_gguf` does. Same bytes as on one
    machine either way. `side_file`: the rtn conversion's OUT.resume, or for a calibrated
    method the folder OUT.layers.resume (each finished layer and the next layer's inputs;
    `resume=True` continues after the last finished layer). Both are removed on success.
    Returns {gguf tensor name: qtype}."""
    key = str(method).lower()
    if resume and not side_file:
        raise ValueError("resume needs the side file (side_file=True)")
    if key == "rtn":
        return convert_rtn(hf_dir, out_path, qtype, address=address, progress=progress,
                           connect_timeout=connect_timeout, resume=resume, side_file=side_file,
                           **options)  # fmt: skip
    if key not in METHODS:
        raise ValueError(
            f"method {method!r} runs on one machine; the cluster runs rtn, {', '.join(METHODS)}"
        )
    if options:
        raise ValueError(f"{', '.join(sorted(options))}: options of the rtn conversion only")
    from ..methods import method_config
    from ..models.calibrated import calibrated_tensors
    from ..models.convert import hf_to_gguf

    sizes = {k: v for k, v in (("n_samples", n_samples), ("seq_len", seq_len)) if v is not None}
    cfg = method_config(key, config, **sizes)
    calib = Path(calibration) if calibration is not None else None
    if calib is not None and not calib.is_file():
        raise FileNotFoundError(f"no such calibration text: {calib}")
    journal = LayerJournal(layers_path(out_path), resume=resume) if side_file else None
    fingerprint = _calibrated_fingerprint(hf_dir, qtype, key, cfg) if side_file else ""
    ray, connected = _connected(address, connect_timeout)
    try:
        runner = RayRunner(ray, journal=journal, fingerprint=fingerprint)
        tensors = calibrated_tensors(hf_dir, qtype, key, cfg, calib, progress=progress,
                                     runner=runner)  # fmt: skip
    finally:
        if connected:
            ray.shutdown()
    chosen = hf_to_gguf(hf_dir, out_path, qtype, progress=progress, tensors=tensors)
    if journal is not None:
        journal.remove()
    return chosen


def _calibrated_fingerprint(hf_dir: Any, qtype: str, method: str, cfg: Any) -> str:
    """What identifies a calibrated conversion besides its calibration tokens: the checkpoint's
    shards (names, sizes, mtimes), the plan, the method and its settings, the version."""
    from ..models.convert import plan_hf_to_gguf
    from .checkpoint import describe_source
    from .driver import _fingerprint

    plan = plan_hf_to_gguf(Path(hf_dir).resolve(), qtype)
    return _fingerprint(plan, describe_source(plan.headers), method, repr(cfg))
