"""llama.cpp's importance-matrix files: the GGUF format of tools/imatrix (read and written) and the
legacy `.dat` format (read).

GGUF (what `llama-imatrix -o x.gguf` writes): `general.type = "imatrix"`, `imatrix.datasets`
(array of strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight matrix
`<name>.in_sum2` (f32, ne = [cols, n_mat]: the sum over tokens of x_j^2) and `<name>.counts`
(f32, ne = [1, n_mat]: the number of tokens), tensors sorted by name. Newer llama.cpp also writes
`<name>.in_sum` (the plain sums); it is read and ignored.

Legacy `.dat`: i32 n_entries, then per entry i32 name length, name, i32 ncall, i32 nval, nval f32
(each = in_sum2 / count * ncall); then i32 chunk count and i32 length + dataset name. llama.cpp
reads its values back as in_sum2 = value, count = ncall (so the per-token mean is value / ncall).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import gguf as fg

__all__ = ["ImatrixEntry", "ImportanceMatrix", "read_imatrix", "write_imatrix"]


@dataclass
class ImatrixEntry:
    """One weight matrix: the sum of x_j^2 per input column over `count` tokens (one row per
    expert for merged-expert tensors; dense tensors have one)."""

    in_sum2: np.ndarray  # float32 [n_mat, cols]
    counts: np.ndarray  # float32 [n_mat]

    @property
    def cols(self) -> int:
        return int(self.in_sum2.shape[-1])

    def values(self) -> np.ndarray:
        """What llama-quantize hands ggml as quant_weights: in_sum2 / count (float32, [cols] for
        a dense tensor); a matrix that saw no token gets 1 everywhere, as llama.cpp does."""
        out = np.ones_like(self.in_sum2, dtype=np.float32)
        for m, c in enumerate(self.counts):
            if c > 0:
                out[m] = self.in_sum2[m] / np.float32(c)
        return out.reshape(-1) if out.shape[0] == 1 else out


@dataclass
class ImportanceMatrix:
    """An importance matrix: entries by llama.cpp tensor name (blk.N.attn_q.weight, ...)."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self, name: str) -> np.ndarray | None:
        e = self.entries.get(name)
        return None if e is None else e.values()


def write_imatrix(imatrix: ImportanceMatrix, path: str | os.PathLike[str]) -> None:
    """Write `imatrix` in llama.cpp's GGUF imatrix format (atomically)."""
    w = fg.GGUFWriter(path)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(imatrix.datasets), "string")
    w.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
    with w:
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            n_mat = e.in_sum2.shape[0]
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.in_sum2, dtype=np.float32))
            w.add_tensor(
                f"{name}.counts", np.ascontiguousarray(e.counts, dtype=np.float32).reshape(n_mat, 1)
            )
        w.write_tensors_to_file()


def read_imatrix(path: str | os.PathLike[str]) -> ImportanceMatrix:
    """Read a GGUF imatrix or a legacy `.dat` one (told apart by the GGUF magic);
    `ferroquant.FormatError` naming the entry or field for a malformed file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such imatrix file: {p}")
    with p.open("rb") as f:
        magic = f.read(4)
    return _read_gguf(p) if magic == b"GGUF" else _read_dat(p)


def _read_gguf(p: Path) -> ImportanceMatrix:
    out = ImportanceMatrix()
    with fg.open(p) as f:
        kind = f.metadata.get("general.type")
        if kind != "imatrix":
            raise fg.FormatError(f"{p}: general.type is {kind!r}, not 'imatrix' (a model file?)")
        out.datasets = [str(d) for d in f.metadata.get("imatrix.datasets", [])]
        out.chunk_count = int(f.metadata.get("imatrix.chunk_count", 0))
        out.chunk_size = int(f.metadata.get("imatrix.chunk_size", 0))
        names = [n[: -len(".in_sum2")] for n in f.tensors if n.endswith(".in_sum2")]
        for name in names:
            s, c = f.tensors[f"{name}.in_sum2"], f.tensors.get(f"{name}.counts")
            if c is None:
                raise fg.FormatError(f"{p}: {name}.in_sum2 has no {name}.counts")
            if s.qtype != "f32" or c.qtype != "f32":
                raise fg.FormatError(f"{p}: {name}: in_sum2 / counts must be f32")
            sums = np.array(s.numpy(), dtype=np.float32).reshape(-1, s.shape[-1])
            counts = np.array(c.numpy(), dtype=np.float32).reshape(-1)
            if counts.size != sums.shape[0]:
                raise fg.FormatError(
                    f"{p}: {name}: {counts.size} counts for {sums.shape[0]} matrices"
                )
            if not (np.isfinite(sums).all() and np.isfinite(counts).all()) or (counts < 0).any():
                raise fg.FormatError(f"{p}: {name}: non-finite or negative values")
            out.entries[name] = ImatrixEntry(sums, counts)
    if not out.entries:
        raise fg.FormatError(f"{p}: no <tensor>.in_sum2 entries")
    return out


def _read_dat(p: Path) -> ImportanceMatrix:
    raw = p.read_bytes()
    pos = 0

    def take(fmt: str, what: str) -> tuple:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(raw):
            raise fg.FormatError(f"{p}: truncated at byte {pos} reading {what}")
        v = struct.unpack_from(fmt, raw, pos)
        pos += n
        return v

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries > len(raw) // 12:
        raise fg.FormatError(f"{p}: not an imatrix (entry count {n_entries} at byte 0)")
    out = ImportanceMatrix()
    for k in range(n_entries):
        (n,) = take("<i", f"entry {k}'s name length")
        if n < 1 or pos + n > len(raw):
            raise fg.FormatError(f"{p}: entry {k}: bad name length {n} at byte {pos - 4}")
        name = raw[pos : pos + n].decode("utf-8", "replace")
        pos += n
        ncall, nval = take("<ii", f"{name}'s ncall / nval")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise fg.FormatError(f"{p}: {name}: bad value count {nval} at byte {pos - 4}")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if not np.isfinite(vals).all() or (vals < 0).any():
            raise fg.FormatError(f"{p}: {name}: non-finite or negative values")
        # llama.cpp's load_imatrix_legacy: sums = values, counts = ncall
        out.entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], np.float32))
    if pos + 4 <= len(raw):
        (out.chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(raw):
            (n,) = take("<i", "the dataset name length")
            if 0 < n <= len(raw) - pos:
                out.datasets = [raw[pos : pos + n].decode("utf-8", "replace")]
    return out
