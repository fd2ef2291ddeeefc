"""The driver's look at a sharded checkpoint before anything runs: the checkpoint checked
(`ferroquant.models.checkpoint`, shared with the single-machine convert), and the plan's
tensors cut into tasks (whole tensors, or ranges of whole rows of a large one).

Nothing here imports Ray: it is plain file checking and arithmetic on the plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..gguf import tensor_nbytes
from ..models.checkpoint import DTYPE_SIZE, INDEX, StoredTensor, check_checkpoint, read_header
from ..models.convert import PERMUTED_ARCHES, HFPlan, TensorJob

__all__ = [
    "INDEX",
    "StoredTensor",
    "Task",
    "check_checkpoint",
    "describe_source",
    "read_header",
    "split_tasks",
]


@dataclass(frozen=True)
class Task:
    """One unit of work: rows [start, stop) of plan tensor `index` (None: the whole tensor),
    the bytes the driver ships (object-store transfer) and the bytes the worker returns."""

    index: int
    rows: tuple[int, int] | None
    in_bytes: int
    out_bytes: int


def _row_step(plan: HFPlan, job: TensorJob) -> int:
    """The rows a range must be a multiple of: whole heads for the permuted q/k, else 1."""
    if plan.arch in PERMUTED_ARCHES and ".attn_q." in job.gname:
        return job.shape[0] // plan.n_head
    if plan.arch in PERMUTED_ARCHES and ".attn_k." in job.gname:
        return job.shape[0] // plan.n_head_kv
    return 1


def split_tasks(
    plan: HFPlan, headers: dict[Path, dict[str, StoredTensor]], max_task_bytes: int
) -> list[list[Task]]:
    """For each plan tensor, its tasks in row order: one for the whole tensor, or ranges of
    whole rows whose float32 working copy stays under `max_task_bytes` (the worker holds one
    such copy and its quantized bytes). Generated tensors (hf_name None) get no task."""
    out: list[list[Task]] = []
    for i, job in enumerate(plan.tensors):
        if job.hf_name is None or job.shard is None:
            out.append([])
            continue
        stored = headers[job.shard][job.hf_name]
        rows = job.shape[0] if job.shape else 1
        row_elems = 1
        for s in job.shape[1:]:
            row_elems *= s
        in_row = row_elems * DTYPE_SIZE[stored.dtype]
        out_row = tensor_nbytes((1, *job.shape[1:]) if job.shape else (1,), job.qtype)
        step = _row_step(plan, job)
        per_task = max(step, (max_task_bytes // max(1, row_elems * 4)) // step * step)
        if len(job.shape) < 2 or per_task >= rows:
            out.append([Task(i, None, in_row * rows, out_row * rows)])
            continue
        out.append(
            [
                Task(
                    i,
                    (a, min(a + per_task, rows)),
                    in_row * (min(a + per_task, rows) - a),
                    out_row * (min(a + per_task, rows) - a),
                )  # fmt: skip
                for a in range(0, rows, per_task)
            ]
        )
    return out


def describe_source(headers: dict[Path, dict[str, StoredTensor]]) -> list[Any]:
    """What identifies the checkpoint for a resume: each shard's name, size and mtime."""
    out = []
    for shard in sorted(headers):
        st = shard.stat()
        out.append([shard.name, st.st_size, st.st_mtime_ns])
    return out
