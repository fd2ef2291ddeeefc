"""What a Ray task runs: the single-machine per-tensor conversion (`convert_tensor`) on one
tensor or a range of its rows, read from the shard on the worker's own filesystem or handed
over by the driver through the object store. Ray is not imported here: the driver wraps
`convert_part` with `ray.remote`."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ..models.convert import HFPlan, convert_tensor, load_hf_tensor
from ..tensor import QTensor
from .direct import write_at

# the driver's payload for the object-store transfer: (raw bytes, torch dtype name, shape)
Payload = tuple[np.ndarray, str, tuple[int, ...]]


def as_bytes(x: np.ndarray | QTensor) -> np.ndarray:
    """The bytes a converted tensor takes in the GGUF file, flat uint8."""
    if isinstance(x, QTensor):
        return np.ascontiguousarray(x.data, np.uint8).reshape(-1)
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def to_payload(t: Any) -> Payload:
    """A torch tensor (as `load_hf_tensor` returns it) as raw bytes for the object store."""
    import torch

    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return raw, str(t.dtype).removeprefix("torch."), tuple(t.shape)


def from_payload(p: Payload) -> Any:
    import torch

    raw, dtype, shape = p
    return torch.from_numpy(np.array(raw)).view(getattr(torch, dtype)).reshape(shape)


def convert_part(
    plan: HFPlan,
    index: int,
    rows: tuple[int, int] | None,
    payload: Payload | None,
    threads: int | None,
    importance: np.ndarray | None = None,
    out: tuple[str, int] | None = None,
) -> tuple[np.ndarray | int, int]:
    """Rows `rows` (None: all) of plan tensor `index`, converted (with the imatrix's per-column
    `importance` where given): the bytes they take in the file, and their crc32 (for the
    driver's resume file). `out` = (file, offset): the bytes are written there instead and
    their count is returned. Errors name the shard and tensor."""
    import ferroquant

    if threads and ferroquant.num_threads() != threads:
        ferroquant.set_num_threads(threads)
    if threads:  # torch's casts too (Ray sets OMP_NUM_THREADS to the task's CPUs)
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    job = plan.tensors[index]
    assert job.shard is not None and job.hf_name is not None
    try:
        if payload is None:
            x = load_hf_tensor(job.shard, job.hf_name, rows)
        else:
            x = from_payload(payload)
        data = as_bytes(convert_tensor(plan, job, x, importance))
        crc = zlib.crc32(memoryview(data))
        if out is not None:
            try:
                write_at(out[0], out[1], data)
            except OSError as e:
                raise OSError(
                    f"cannot write the output file {out[0]} from this node ({e.strerror or e}); "
                    "--ray-write workers needs it on a filesystem every node sees"
                ) from None
            return data.nbytes, crc
        return data, crc
    except Exception as e:
        where = f" rows {rows[0]}:{rows[1]}" if rows else ""
        raise ValueError(f"{job.shard}: tensor {job.hf_name}{where}: {e}") from None
