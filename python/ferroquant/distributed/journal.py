"""The resume side file: which tensors a conversion has written, next to the output
(`OUT.resume`), removed when the output is complete. It holds no tensor bytes: those are in the
atomic writer's temporary file (`.OUT.PID.N.tmp`), which a killed driver leaves behind, and a
resumed run copies the finished tensors from there (checking their crc32) into its own.

Layout: the magic line, then records of (u64 length, JSON). The first says which conversion the
file belongs to (a fingerprint of the checkpoint's shards and the plan); a run record
{"run": PID} starts each driver's records; each later one is a tensor that driver wrote:
{"name", "nbytes", "parts": [[nbytes, crc32], ...]} (the crc32 of each part is computed by the
worker that made it). Records are flushed, not fsynced: a tensor whose bytes did not reach the
temporary file (a killed process, a crashed machine) fails its crc32 and is converted again.
A driver killed mid-record leaves a torn tail: reading stops at the first incomplete record and
appending continues from there."""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"ferroquant resume 2\n"
log = logging.getLogger(__name__)


def side_path(out_path: str | os.PathLike[str]) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".resume")


def _temps(out: Path, pid: int) -> list[Path]:
    """The atomic writer's temporary files of process `pid` for `out`."""
    return sorted(out.parent.glob(f".{out.name}.{pid}.*.tmp"))


def remove_stale_temps(
    out_path: str | os.PathLike[str], pids: set[int] | None = None
) -> list[Path]:
    """Remove the temporary files that the writers of the processes `pids` (default: any)
    left next to `out_path`, when those processes no longer run here; their names."""
    out = Path(out_path)
    if pids is None:
        names = (t.name[len(out.name) + 2 :] for t in out.parent.glob(f".{out.name}.*.tmp"))
        pids = {int(p) for p in (n.split(".")[0] for n in names) if p.isdigit()}
    removed = []
    for pid in sorted(pids):
        if _alive(pid):
            continue
        for tmp in _temps(out, pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


class Journal:
    """Finished tensors of one conversion. After a resume, `done` maps each tensor whose bytes
    were found intact in a killed run's temporary file to (that file, offset, nbytes, parts)."""

    keeps_records = True

    def __init__(self, path: Path, fingerprint: str, *, resume: bool, data_bytes: int = 0) -> None:
        """`data_bytes`: at least the tensor data's size (padding included) in the output."""
        self.path = path
        self.out = path.with_name(path.name.removesuffix(".resume"))
        self.done: dict[str, tuple[Path, int, int, list[tuple[int, int]]]] = {}
        self.pids: set[int] = set()
        end = self._read(fingerprint, data_bytes) if resume and path.exists() else None
        if end is None:  # a fresh file; the runs of an old one leave files to clean up
            self.pids = _run_pids(path) if path.exists() else set()
            self._f = open(path, "wb")  # noqa: SIM115 (kept open while the conversion runs)
            self._f.write(MAGIC)
            self._append({"fingerprint": fingerprint})
        else:
            self._f = open(path, "r+b")  # noqa: SIM115
            self._f.truncate(end)
            self._f.seek(end)
        self._append({"run": os.getpid()})
        self._f.flush()

    def _append(self, meta: dict[str, Any]) -> None:
        raw = json.dumps(meta, separators=(",", ":")).encode()
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def _read(self, fingerprint: str, data_bytes: int) -> int:
        """Find the finished tensors; the offset after the last whole record."""
        size = self.path.stat().st_size
        written: dict[str, tuple[int, dict[str, Any]]] = {}  # the latest record of each
        with open(self.path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{self.path}: not a ferroquant resume file; remove it")
            first = _read_record(f, size)
            if first is None or first.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.path}: belongs to another conversion (other checkpoint, qtype or "
                    "version); remove it or convert without --resume"
                )
            end, pid = f.tell(), None
            while (meta := _read_record(f, size)) is not None:
                if "run" in meta:
                    pid = int(meta["run"])
                    self.pids.add(pid)
                elif pid is not None:
                    written[meta["name"]] = (pid, meta)
                end = f.tell()
        for pid in sorted({p for p, _ in written.values()}):
            mine = {n: m for n, (p, m) in written.items() if p == pid}
            for tmp in _temps(self.out, pid):
                if not _alive(pid):
                    self._adopt(tmp, mine, data_bytes)
        return end

    def _adopt(self, tmp: Path, records: dict[str, dict[str, Any]], data_bytes: int) -> None:
        """Take the tensors of `records` whose bytes in `tmp` match their crc32."""
        from .. import _native

        try:
            # the killed writer's file ends mid-data; grown (sparsely) to the whole size, its
            # header gives each tensor's offset, as it will in the new file
            size = tmp.stat().st_size
            os.truncate(tmp, size + data_bytes)
            offsets = {t[0]: t[4] for t in _native.GgufFile(tmp).tensors()}  # closed after
        except (OSError, ValueError) as e:  # the header itself was not written out
            log.info("%s: no finished tensors can be read from it (%s)", tmp, e)
            return
        with open(tmp, "rb") as f:
            for name, meta in records.items():
                if name in self.done or name not in offsets:
                    continue
                parts = [(int(n), int(c)) for n, c in meta.get("parts", [])]
                f.seek(offsets[name])
                if _parts_match(f, parts) and sum(n for n, _ in parts) == int(meta["nbytes"]):
                    self.done[name] = (tmp, offsets[name], int(meta["nbytes"]), parts)

    def add(
        self, name: str, data: np.ndarray | None, parts: list[tuple[int, int]] | None = None
    ) -> None:
        """Record one finished tensor (its bytes as just written into the GGUF file; None: the
        tasks wrote them, `parts` says how many); `parts` are the (nbytes, crc32) of its
        consecutive pieces, computed here when not given."""
        if data is None:
            if parts is None:
                raise ValueError(f"{name}: neither the bytes nor their parts")
            nbytes = sum(n for n, _ in parts)
        else:
            view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
            if parts is None:
                parts = [(view.nbytes, zlib.crc32(view))]
            nbytes = view.nbytes
            if sum(n for n, _ in parts) != nbytes:
                raise ValueError(f"{name}: parts do not add up to {nbytes} bytes")
        self._append({"name": name, "nbytes": nbytes, "parts": [list(p) for p in parts]})
        self._f.flush()

    def read(self, name: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The bytes of a finished tensor (from the killed run's file) and their parts."""
        tmp, offset, nbytes, parts = self.done[name]
        return np.fromfile(tmp, dtype=np.uint8, count=nbytes, offset=offset), parts

    def close(self) -> None:
        self._f.close()

    def remove(self) -> None:
        """The conversion is complete: remove the side file and the killed runs' files."""
        self.close()
        remove_stale_temps(self.out, self.pids)
        self.path.unlink(missing_ok=True)


class NoJournal(Journal):
    """No side file (a conversion that cannot be resumed)."""

    keeps_records = False

    def __init__(self) -> None:
        self.done = {}

    def add(
        self, name: str, data: np.ndarray | None, parts: list[tuple[int, int]] | None = None
    ) -> None:
        pass

    def close(self) -> None:
        pass

    def remove(self) -> None:
        pass


def _read_record(f: Any, size: int) -> dict[str, Any] | None:
    """The next whole record, the file positioned after it; None at the end or a torn one."""
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
    return meta if isinstance(meta, dict) else None


def _run_pids(path: Path) -> set[int]:
    """The processes that wrote into the side file `path` (none when it is not one)."""
    pids: set[int] = set()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            return pids
        while (meta := _read_record(f, size)) is not None:
            if "run" in meta:
                pids.add(int(meta["run"]))
    return pids


def _parts_match(f: Any, parts: list[tuple[int, int]]) -> bool:
    """Whether the next bytes of `f` are `parts` (nbytes, crc32) in turn."""
    for n_part, want in parts:
        crc, left = 0, n_part
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                return False
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        if crc != want:
            return False
    return True
