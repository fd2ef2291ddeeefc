"""The resume side file: the converted bytes of every tensor already written, appended as the
driver writes them, next to the output (`OUT.resume`), removed when the output is complete.

Layout: the magic line, then records of (u64 length, JSON) headers and raw bytes. The first
record says which conversion the file belongs to (a fingerprint of the checkpoint's shards and
the plan); each later one is a tensor: {"name", "nbytes", "parts": [[nbytes, crc32], ...]} and
its bytes (the crc32 of each part is computed by the worker that made it). A driver killed
mid-record leaves a torn tail: reading stops at the first incomplete or mismatching record and
appending continues from there."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"ferroquant resume 1\n"


def side_path(out_path: str | os.PathLike[str]) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".resume")


def remove_stale_temps(out_path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files a killed writer left next to `out_path` (the atomic writer's
    `.NAME.PID.N.tmp`, whose process PID no longer runs on this machine); their names."""
    out = Path(out_path)
    removed = []
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        pid = tmp.name[len(out.name) + 2 :].split(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


class Journal:
    """Finished tensors of one conversion; `done` maps a tensor name to (offset, nbytes)."""

    def __init__(self, path: Path, fingerprint: str, *, resume: bool) -> None:
        self.path = path
        self.done: dict[str, tuple[int, int]] = {}
        end = self._read(fingerprint) if resume and path.exists() else None
        if end is None:  # a fresh file
            self._f = open(path, "wb")  # noqa: SIM115 (kept open while the conversion runs)
            self._f.write(MAGIC)
            raw = json.dumps({"fingerprint": fingerprint}).encode()
            self._f.write(struct.pack("<Q", len(raw)) + raw)
            self.done = {}
        else:
            self._f = open(path, "r+b")  # noqa: SIM115
            self._f.truncate(end)
            self._f.seek(end)
        self._f.flush()

    def _read(self, fingerprint: str) -> int | None:
        """Load the finished tensors; the offset after the last whole record."""
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{self.path}: not a ferroquant resume file; remove it")
            first = _read_record(f, size)
            if first is None or first[0].get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.path}: belongs to another conversion (other checkpoint, qtype or "
                    "version); remove it or convert without --resume"
                )
            end = f.tell()
            while (rec := _read_record(f, size)) is not None:
                meta, offset = rec
                self.done[meta["name"]] = (offset, int(meta["nbytes"]))
                end = f.tell()
        return end

    def add(self, name: str, data: np.ndarray, parts: list[tuple[int, int]] | None = None) -> None:
        """Append one finished tensor (its bytes as written into the GGUF file); `parts` are the
        (nbytes, crc32) of its consecutive pieces, computed here when not given."""
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if parts is None:
            parts = [(view.nbytes, zlib.crc32(view))]
        if sum(n for n, _ in parts) != view.nbytes:
            raise ValueError(f"{name}: parts do not add up to {view.nbytes} bytes")
        offset = self._f.tell() + 8
        meta = {"name": name, "nbytes": view.nbytes, "parts": [list(p) for p in parts]}
        raw = json.dumps(meta, separators=(",", ":")).encode()
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.write(view)
        self._f.flush()
        self.done[name] = (offset + len(raw), view.nbytes)

    def read(self, name: str) -> np.ndarray:
        """The bytes of a finished tensor."""
        offset, nbytes = self.done[name]
        return np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset)

    def close(self) -> None:
        self._f.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class NoJournal(Journal):
    """No side file (a conversion that cannot be resumed, and writes its bytes once)."""

    def __init__(self) -> None:
        self.done = {}

    def add(self, name: str, data: np.ndarray, parts: list[tuple[int, int]] | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def remove(self) -> None:
        pass


def _read_record(f: Any, size: int) -> tuple[dict[str, Any], int] | None:
    """(header, data offset) of the next whole record whose parts match their crc32, the file
    positioned after it; None at the end or at a torn record."""
    start = f.tell()
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if start + 8 + n > size:
        return None
    try:
        meta = json.loads(f.read(n))
    except ValueError:
        return None
    nbytes = int(meta.get("nbytes", 0))
    offset = f.tell()
    if offset + nbytes > size:
        return None
    for n_part, want in meta.get("parts", []):
        crc, left = 0, int(n_part)
        while left:
            chunk = f.read(min(left, 1 << 24))
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        if crc != want:
            return None
    return meta, offset
