"""A sharded safetensors checkpoint checked before a conversion reads it: every shard the index
names is there, every header is whole and consistent with its file's size, and every tensor the
index places in a shard is in it. Each failure is a ValueError naming the file at fault. Used by
`ferroquant convert` on one machine and on Ray alike."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
DTYPE_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes sit in its shard: dtype name, shape, [start, stop) of the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(shard: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, with the checks safetensors makes when it maps the
    file (header length, JSON, offsets inside the data, data size = file size after the
    header); any failure is a ValueError naming the file."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} runs past the file's {size} bytes")
            raw = json.loads(f.read(n))
        if not isinstance(raw, dict):
            raise ValueError("the header is not a JSON object")
        out: dict[str, StoredTensor] = {}
        end = 0
        for name, info in raw.items():
            if name == "__metadata__":
                continue
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            start, stop = (int(o) for o in info["data_offsets"])
            n_elem = 1
            for s in shape:
                n_elem *= s
            if dtype not in DTYPE_SIZE or stop - start != n_elem * DTYPE_SIZE[dtype] or start < 0:
                where = f"[{start}, {stop})"
                raise ValueError(f"tensor {name!r}: {dtype} {list(shape)} does not fit {where}")
            out[name] = StoredTensor(dtype, shape, start, stop)
            end = max(end, stop)
        if 8 + n + end != size:
            raise ValueError(
                f"the header describes {8 + n + end} bytes, the file holds {size} (truncated?)"
            )
        return out
    except json.JSONDecodeError as e:
        raise ValueError(f"{shard}: malformed safetensors header (JSON: {e})") from None
    except ValueError as e:
        raise ValueError(f"{shard}: not a valid safetensors file: {e}") from None
    except (KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{shard}: malformed safetensors header ({e!r})") from None
    except OSError as e:
        raise ValueError(f"{shard}: cannot read: {e.strerror or e}") from None


def check_checkpoint(hf_dir: Path) -> dict[Path, dict[str, StoredTensor]]:
    """Every shard's header, checked; with an index file, every shard and tensor it names must
    be there. Raises ValueError naming the file at fault."""
    hf_dir = Path(hf_dir)
    shards = set(hf_dir.glob("*.safetensors"))
    index = hf_dir / INDEX
    weight_map: dict[str, str] = {}
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index ({e!r})") from None
        for shard_name in sorted(set(weight_map.values())):
            path = hf_dir / shard_name
            if not path.is_file():
                raise ValueError(f"{path}: missing, but {INDEX} names it")
            shards.add(path)
    headers = {shard: read_header(shard) for shard in sorted(shards)}
    for name, shard_name in weight_map.items():
        if name not in headers[hf_dir / shard_name]:
            shard = hf_dir / shard_name
            raise ValueError(f"{shard}: has no tensor {name!r}, which {INDEX} puts there")
    return headers
