"""The output file written by the workers themselves (`convert(write="workers")`): the driver
lays out the GGUF file (the header that the single-machine writer writes, every tensor's offset)
in a temporary file next to the output, sized to its final length; each task writes its bytes at
its offset with `pwrite` and returns only their crc32, so the results never travel through Ray's
object stores nor through the driver. The file must be on a filesystem every node sees at the
same path (as the shards are with `shared-fs`). The temporary file is named like the atomic
writer's (`.OUT.PID.X.tmp`), so a killed driver's file is what `--resume` copies from; on success
it is fsynced and renamed into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from ..models.convert import HFPlan, _Writer, write_header


def header_bytes(plan: HFPlan, name: str | None, tokenizer_pre: str | None) -> bytes:
    """The bytes the single-machine writer puts before the first tensor's data."""
    with tempfile.TemporaryDirectory(prefix="ferroquant-header-") as d:
        w = _Writer(Path(d) / "header.gguf", plan.arch)
        try:
            write_header(w, plan, name, tokenizer_pre)
            w.flush()
            (tmp,) = [p for p in Path(d).iterdir() if p.name != "header.gguf"]
            return tmp.read_bytes()
        finally:
            w.abort()


class DirectFile:
    """The temporary output file the workers write into; `offsets` by GGUF tensor name."""

    def __init__(self, out_path: Path, header: bytes, data_bytes: int) -> None:
        """`data_bytes`: at least the tensor data's size, padding included."""
        from .. import _native

        self.out = out_path
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=out_path.parent)  # fmt: skip
        self.path = Path(tmp)
        try:
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + data_bytes)  # the header's offsets, read back
            tensors = _native.GgufFile(self.path).tensors()
            self.offsets = {t[0]: int(t[4]) for t in tensors}
            size = max((int(t[4]) + int(t[5]) for t in tensors), default=len(header))
            os.ftruncate(fd, size)  # the writer's file ends with the last tensor's data
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self.fd = fd

    def write(self, name: str, data: np.ndarray) -> None:
        """The driver's own tensors (metadata tensors, those copied from a killed run)."""
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        at, done = self.offsets[name], 0
        while done < view.nbytes:
            done += os.pwrite(self.fd, view[done:], at + done)

    def finish(self) -> None:
        """fsync, rename into place, persist the rename."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.path, self.out)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


def write_at(path: str, offset: int, data: np.ndarray) -> None:
    """A task's bytes into the output file (the same bytes at the same place when retried)."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)
