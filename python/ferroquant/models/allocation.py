"""`convert --target-size / --target-bpw`: a Hugging Face folder -> a GGUF file of at most the
target size, one measured qtype per tensor (`methods.allocate`), written by `hf_to_gguf` as an
ordinary GGUF. The plan's summary goes into the file (`ferroquant.allocation.*`: tensor names and
their scores) for `ferroquant inspect`; the whole plan (every candidate's bytes and score) can be
saved as JSON and reused: a saved plan re-optimised to another size needs no measurement pass.

The target counts the whole file: metadata, tensor infos, alignment padding and the tensors the
allocator does not choose (norms, rope factors, f32) are measured first and taken off the
budget, so the written file is never larger than the target.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..methods.allocate import AllocationPlan, TensorMeasure, measure_tensor, model_fingerprint
from ..methods.allocate import optimise as _optimise
from ..methods.imatrix_io import ImportanceMatrix
from .convert import (
    HFPlan,
    TensorJob,
    _quantizable,
    _Writer,
    check_imatrix_for,
    hf_to_gguf,
    load_hf_tensor,
    plan_hf_to_gguf,
    write_header,
)
from .recipes import Recipe

__all__ = ["PlannedRecipe", "allocate_hf_to_gguf", "parse_size"]

METRIC = "fisher-weighted output error: 1/2 sum_ij E[g_i^2] E[x_j^2] (W-Q)_ij^2 (nats per token)"
_ALIGN_SLACK = 32  # at most alignment - 1 bytes of padding after each tensor


def parse_size(text: str) -> int:
    """'110MB', '1.5GiB', '123456' -> bytes (k/M/G = powers of 1000, Ki/Mi/Gi of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?)[bB]?\s*", str(text))
    if m is None:
        raise ValueError(f"--target-size: cannot read {text!r} (e.g. 110MB, 0.5GiB, 123456)")
    base = 1024 if m.group(3) else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3}[m.group(2).lower()]
    return int(float(m.group(1)) * base**power)


@dataclasses.dataclass
class PlannedRecipe(Recipe):
    """A recipe that gives each tensor the qtype a plan chose (file type: the most used one)."""

    chosen: dict[str, str] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # HF module -> GGUF name

    def tensor_type(
        self, name: str, shape: tuple[int, ...], i_layer: int, n_layer: int, tied: bool = False
    ) -> str:
        key = self.aliases.get(name, name)
        if key not in self.chosen:
            raise ValueError(f"{name}: not in the allocation plan")
        return self.chosen[key]


def _planned_recipe(chosen: dict[str, str], plan: HFPlan) -> PlannedRecipe:
    common = Counter(chosen.values()).most_common(1)[0][0]
    aliases = {
        t.hf_name.removesuffix(".weight"): t.gname for t in plan.tensors if t.hf_name is not None
    }
    return PlannedRecipe(common, common, ("lm_head",), 1, chosen, aliases)


def _chosen_jobs(plan: HFPlan) -> list[TensorJob]:
    return [t for t in plan.tensors if t.hf_name is not None and _quantizable(t.gname, t.shape)]


def _summary(p: AllocationPlan) -> dict[str, Any]:
    rows = p.rows()
    return {
        "ferroquant.allocation.metric": p.metric,
        "ferroquant.allocation.target_bytes": np.uint64(p.extra.get("target_bytes", 0)),
        "ferroquant.allocation.tensors": [r[0] for r in rows],
        "ferroquant.allocation.scores": np.array([r[3] for r in rows], dtype=np.float32),
    }


def _fixed_bytes(plan: HFPlan, meta: dict[str, Any]) -> int:
    """Bytes of the file that the allocator does not choose: header, metadata, tensor infos, the
    tensors outside the plan and an upper bound of the padding (measured by writing the header
    with every tensor shrunk to one element)."""
    chosen = {t.gname for t in _chosen_jobs(plan)}
    tiny = [dataclasses.replace(t, shape=(1,) * len(t.shape), qtype="f32") for t in plan.tensors]
    dry = dataclasses.replace(plan, tensors=tiny)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "header.gguf"
        with _Writer(path, plan.arch) as w:
            write_header(w, dry)
            for key, val in meta.items():
                w.add_key_value(key, val, None)
            for t in tiny:
                w.write_tensor_data(np.zeros(t.shape, np.float32))
        header = path.stat().st_size - len(tiny) * _ALIGN_SLACK  # each 4-byte tensor pads to 32
    others = 0
    for t in plan.tensors:
        if t.gname not in chosen:
            n = int(np.prod(t.shape, dtype=np.int64))
            others += n * (4 if t.qtype == "f32" else 2)
    return header + others + len(plan.tensors) * _ALIGN_SLACK


def measure_model(
    hf_dir: Path,
    plan: HFPlan,
    imatrix: ImportanceMatrix | None,
    calibration: Any,
    n_samples: int,
    seq_len: int,
    progress: bool,
) -> tuple[list[TensorMeasure], str]:
    """Sensitivities from the calibration windows, then every candidate of every tensor."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..calib import calibration_ids
    from ..methods.imatrix import gguf_linear_names
    from ..methods.sensitivity import measure_sensitivity

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = calibration_ids(calibration, tok, n_samples, seq_len)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def tick(k: int, n: int) -> None:
        if progress:
            print(f"\rmeasure: window {k}/{n}", end="" if k < n else "\n", file=sys.stderr)

    sens = measure_sensitivity(model, ids, gguf_linear_names(model, plan.arch), progress=tick)
    del model
    jobs = _chosen_jobs(plan)
    out = []
    for k, job in enumerate(jobs):
        if job.gname not in sens:
            raise ValueError(f"{job.gname}: not measured (not a Linear or the embedding)")
        assert job.shard is not None and job.hf_name is not None
        w = load_hf_tensor(job.shard, job.hf_name).to(torch.float32).numpy()
        imp = imatrix.values(job.gname) if imatrix is not None else None
        out.append(measure_tensor(job.gname, w, sens[job.gname], imp))
        if progress:
            print(f"\rmeasure: tensor {k + 1}/{len(jobs)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return out, f"{n_samples} x {seq_len} tokens"


def allocate_hf_to_gguf(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    target_bytes: int | None = None,
    target_bpw: float | None = None,
    imatrix: ImportanceMatrix | None = None,
    imatrix_name: str = "",
    calibration: Any = None,
    n_samples: int = 16,
    seq_len: int = 512,
    plan_path: str | os.PathLike[str] | None = None,
    tensors_for: Any = None,
    exclude: tuple[str, ...] = (),
    progress: bool = False,
) -> AllocationPlan:
    """Measure (or load `plan_path` when it exists), choose one qtype per tensor for the target
    (bytes of the whole file, or bits per weight over the chosen tensors), save the plan to
    `plan_path` (when given and new) and write the GGUF. `tensors_for(recipe)` may return
    precomputed QTensors (e.g. GPTQ with the chosen types). `exclude` drops candidate qtypes
    from the choice (the plan keeps their measurements). Nothing is written when the target is
    out of reach or the plan / imatrix belongs to another model."""
    hf_dir = Path(hf_dir)
    reuse = plan_path is not None and Path(plan_path).is_file()
    if target_bytes is None and target_bpw is None and not reuse:
        raise ValueError("give --target-size or --target-bpw (or an existing --plan to reuse)")
    plan = plan_hf_to_gguf(hf_dir, "f16")
    jobs = _chosen_jobs(plan)
    shapes = {t.gname: tuple(t.shape) for t in jobs}
    if imatrix is not None:
        check_imatrix_for(imatrix, {t.gname: t.shape for t in plan.tensors})
    fp = model_fingerprint(shapes)
    saved = None
    if reuse:
        assert plan_path is not None
        saved = AllocationPlan.load(plan_path)
        saved.check_model(shapes, str(plan_path))
        measures = saved.tensors
        calib_what = saved.calibration
    else:
        measures, calib_what = measure_model(
            hf_dir, plan, imatrix, calibration, n_samples, seq_len, progress
        )
    if exclude:
        measures = [
            TensorMeasure(m.name, m.shape, {q: v for q, v in m.options.items() if q not in exclude})
            for m in measures
        ]
        if any(not m.options for m in measures):
            raise ValueError(f"excluding {', '.join(exclude)} leaves a tensor with no candidate")
    n_weights = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    if target_bytes is None and target_bpw is None:
        if saved is None:
            raise ValueError("give --target-size or --target-bpw (or a saved --plan to reuse)")
        target_bytes = int(saved.extra.get("target_bytes", 0)) or None
        target_bpw = saved.extra.get("target_bpw")
    first = {m.name: next(iter(m.options)) for m in measures}
    probe = AllocationPlan(fp, METRIC, 0, measures, first)
    if target_bpw is not None:
        budget = int(target_bpw * n_weights / 8)
        what = {"target_bpw": float(target_bpw)}
    else:
        assert target_bytes is not None
        probe.extra = {"target_bytes": int(target_bytes)}
        fixed = _fixed_bytes(plan, _summary(probe))
        budget = int(target_bytes) - fixed
        what = {"target_bytes": int(target_bytes), "fixed_bytes": fixed}
    try:
        chosen = _optimise(measures, budget)
    except ValueError as e:
        if target_bytes is None:
            raise ValueError(f"--target-bpw {target_bpw}: {e}") from None
        lo = sum(min(b for b, _ in m.options.values()) for m in measures) + what["fixed_bytes"]
        hi = sum(max(b for b, _ in m.options.values()) for m in measures) + what["fixed_bytes"]
        raise ValueError(
            f"--target-size {target_bytes} bytes is out of reach for this model: the smallest "
            f"file is {lo} bytes, the largest {hi} bytes"
        ) from None
    result = AllocationPlan(fp, METRIC, budget, measures, chosen, imatrix_name, calib_what, what)
    recipe = _planned_recipe(chosen, plan)
    tensors = tensors_for(recipe) if tensors_for is not None else None
    hf_to_gguf(hf_dir, out_path, recipe, progress=progress, imatrix=imatrix,
               metadata=_summary(result), tensors=tensors)  # fmt: skip
    if plan_path is not None and saved is None:  # a reused plan stays as it was measured
        result.save(plan_path)
    return result
