"""`convert` on a Ray cluster: the driver plans, fans the tensors (or row ranges of large ones)
out as Ray tasks running the single-machine `convert_tensor`, and streams the results into the
atomic GGUF writer in tensor order, with a bounded window of bytes in flight.

    import ferroquant.distributed as fd
    fd.convert("Llama-3-8B/", "llama3.q4_k_m.gguf", "q4_k_m", address="auto")

The driver owns ordering, the file and the resume side file; workers only compute. A worker
that dies has its tasks retried by Ray (`max_retries`), and since the conversion of a tensor
does not depend on where or with how many threads it runs, the bytes are the same."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._extras import require
from ..gguf import tensor_nbytes
from ..models.convert import (
    HFPlan,
    _Writer,
    check_imatrix_for,
    load_hf_tensor,
    plan_hf_to_gguf,
    write_header,
)
from ..models.recipes import Recipe
from ..qtypes import IMATRIX_QTYPES
from .checkpoint import Task, describe_source, split_tasks
from .direct import DirectFile, header_bytes
from .journal import Journal, NoJournal, side_path
from .worker import as_bytes, convert_part, to_payload

if TYPE_CHECKING:
    from ..methods.imatrix_io import ImportanceMatrix

log = logging.getLogger(__name__)
TRANSFERS = ("shared-fs", "object-store")
WRITES = ("driver", "workers")  # who writes the results into the output file
DEFAULT_WINDOW = 1 << 30  # bytes in flight at the driver
DEFAULT_TASK_BYTES = 256 << 20  # a worker's float32 working copy per task


class ClusterError(ConnectionError):
    """Ray could not run a task (its workers or nodes kept dying past the retries)."""


def connect(address: str | None = None, timeout: float = 30.0) -> bool:
    """Connect this process to a Ray cluster (`auto`, `HOST:PORT` or `ray://HOST:PORT`), unless
    it already is; True when this call connected (and the caller should disconnect). An address
    that does not answer is one ConnectionError within `timeout` seconds."""
    ray = require("ray", "ferroquant convert --ray", "distributed")
    if ray.is_initialized():
        return False
    addr = address or "auto"
    if addr != "auto":
        hostport = addr.removeprefix("ray://")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Ray address {addr!r}: expected auto, HOST:PORT or ray://HOST:PORT")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise ConnectionError(f"cannot reach the Ray cluster at {addr}: {why}") from None
    try:
        ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"cannot connect to the Ray cluster at {addr}: {first}") from None
    return True


def _fingerprint(
    plan: HFPlan,
    source: list[Any],
    name: str | None,
    pre: str | None,
    importance: dict[int, np.ndarray] | None = None,
) -> str:
    from .. import __version__

    tensors = [[t.gname, list(t.shape), t.qtype] for t in plan.tensors]
    blob = json.dumps([__version__, plan.recipe.name, name, pre, tensors, source])
    h = hashlib.sha256(blob.encode())
    for i, values in sorted((importance or {}).items()):  # another imatrix: another output
        h.update(str(i).encode())
        h.update(np.ascontiguousarray(values, np.float32).tobytes())
    return h.hexdigest()


def convert(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str | Recipe = "f16",
    *,
    address: str | None = None,
    transfer: str = "shared-fs",
    write: str = "driver",
    window_bytes: int = DEFAULT_WINDOW,
    max_task_bytes: int = DEFAULT_TASK_BYTES,
    num_cpus: float = 1,
    threads: int | None = None,
    max_retries: int = 3,
    resume: bool = False,
    side_file: bool = True,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    imatrix: ImportanceMatrix | None = None,
    progress: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
    connect_timeout: float = 30.0,
) -> dict[str, str]:
    """`hf_to_gguf` on a Ray cluster, with the same bytes. `transfer` is "shared-fs" (each worker
    memory-maps the shards: every node sees the checkpoint at the same path) or "object-store"
    (the driver reads each tensor and ships it through Ray's object store). `write` is
    "driver" (the results travel back through the object store and the driver writes them) or
    "workers" (each task writes its bytes into the output's temporary file itself, which must be
    on a filesystem every node sees at the same path; only crc32s travel). At most
    `window_bytes` of results (and, object-store, inputs) are in flight; a tensor whose float32
    copy exceeds `max_task_bytes` is cut into tasks of whole rows. Each task asks Ray for
    `num_cpus` and runs the Rust core on `threads` threads (default: `num_cpus`). Finished
    tensors are listed in a side file (OUT.resume, removed on success; no tensor bytes);
    `resume=True` continues from it, copying them from the killed run's temporary file;
    `side_file=False` writes none (no resume). `imatrix` (checked against the tensors before
    anything is written) goes with each task whose quantizer takes one, as in `hf_to_gguf`.
    `on_tensor(name, done, total)` is called after each tensor is written (from the driver's
    writer thread)."""
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
    if write not in WRITES:
        raise ValueError(f"write must be one of {', '.join(WRITES)}, got {write!r}")
    if resume and not side_file:
        raise ValueError("resume needs the side file (side_file=True)")
    if window_bytes <= 0 or max_task_bytes <= 0:
        raise ValueError("window_bytes and max_task_bytes must be positive")
    ray = require("ray", "ferroquant convert --ray", "distributed")
    hf_dir = Path(hf_dir).resolve()  # workers see the same absolute path (shared-fs)
    out_path = Path(out_path)
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir}: not a folder")
    plan = plan_hf_to_gguf(hf_dir, qtype)  # bad shards fail here, before anything is written
    importance = None
    if imatrix is not None:
        check_imatrix_for(imatrix, {t.gname: t.shape for t in plan.tensors})
        importance = {
            i: v
            for i, t in enumerate(plan.tensors)
            if t.qtype in IMATRIX_QTYPES and (v := imatrix.values(t.gname)) is not None
        }
    headers = plan.headers
    tasks = split_tasks(plan, headers, max_task_bytes)
    fingerprint = _fingerprint(plan, describe_source(headers), name, tokenizer_pre, importance)
    data_bytes = sum(tensor_nbytes(t.shape, t.qtype) + 4096 for t in plan.tensors)
    connected = connect(address, connect_timeout)
    try:
        run = _Run(ray, plan, tasks, transfer, window_bytes, num_cpus, threads, max_retries)
        run.importance = importance or {}

        def open_journal() -> Journal:
            journal = (
                Journal(side_path(out_path), fingerprint, resume=resume, data_bytes=data_bytes)
                if side_file
                else NoJournal()
            )
            if journal.done:
                log.info(
                    "resuming: %d of %d tensors from %s",
                    len(journal.done),
                    len(plan.tensors),
                    journal.path,
                )
            return journal

        if write == "workers":
            direct = DirectFile(out_path, header_bytes(plan, name, tokenizer_pre), data_bytes)
            try:
                journal = open_journal()
                try:
                    run.write(direct, journal, progress, on_tensor)
                finally:
                    journal.close()
                direct.finish()
            except BaseException:
                direct.abort()
                raise
        else:
            with _Writer(out_path, plan.arch) as w:
                write_header(w, plan, name, tokenizer_pre)
                journal = open_journal()
                try:
                    run.write(w, journal, progress, on_tensor)
                finally:
                    journal.close()
        journal.remove()
    finally:
        if connected:
            ray.shutdown()
    return plan.chosen


class _Run:
    """One conversion's task queue and in-order writing."""

    def __init__(
        self,
        ray: Any,
        plan: HFPlan,
        tasks: list[list[Task]],
        transfer: str,
        window: int,
        num_cpus: float,
        threads: int | None,
        max_retries: int,
    ) -> None:
        self.ray, self.plan, self.tasks = ray, plan, tasks
        self.transfer, self.window = transfer, window
        self.threads = threads if threads is not None else max(1, int(num_cpus))
        self.max_retries = max_retries
        self.remote = ray.remote(convert_part).options(
            num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False
        )
        # the window bounds the bytes in flight; the count cap only keeps the queue of submitted
        # tasks short. It is generous (4 per task slot) because results are taken in tensor
        # order: while the oldest task runs, the other slots go on with later ones
        cpus = float(ray.cluster_resources().get("CPU", 1))
        self.max_tasks = max(4, int(4 * cpus / max(num_cpus, 1e-3)))
        self.queue: deque[Task] = deque()
        self.inflight: deque[tuple[Task, Any, Any]] = deque()
        self.bytes_in_flight = 0
        self.peak_in_flight = 0
        self.importance: dict[int, np.ndarray] = {}
        self.targets: dict[int, tuple[str, int]] = {}  # write="workers": (file, offset) by task

    def _cost(self, t: Task) -> int:
        return t.out_bytes + (t.in_bytes if self.transfer == "object-store" else 0)

    def _top_up(self) -> None:
        """Submit queued tasks while the window and the task cap allow (always one)."""
        while self.queue and (
            not self.inflight
            or (
                self.bytes_in_flight + self._cost(self.queue[0]) <= self.window
                and len(self.inflight) < self.max_tasks
            )
        ):
            t = self.queue.popleft()
            payload = None
            if self.transfer == "object-store":
                job = self.plan.tensors[t.index]
                assert job.shard is not None and job.hf_name is not None
                payload = self.ray.put(to_payload(load_hf_tensor(job.shard, job.hf_name, t.rows)))
            imp = self.importance.get(t.index)  # per column: the same for every row range
            out = self.targets.get(id(t))
            ref = self.remote.remote(self.plan_ref, t.index, t.rows, payload, self.threads, imp,
                                     out)  # fmt: skip
            self.inflight.append((t, ref, payload))
            self.bytes_in_flight += self._cost(t)
            self.peak_in_flight = max(self.peak_in_flight, self.bytes_in_flight)

    def _next_result(self, index: int) -> tuple[np.ndarray | int, int]:
        self._top_up()
        t, ref, _payload = self.inflight.popleft()
        assert t.index == index, (t.index, index)
        try:
            data, crc = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            msg = str(cause) if cause is not None else str(e).strip().splitlines()[-1]
            raise ValueError(msg) from None
        except self.ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ClusterError(
                f"Ray could not run the task for {self.plan.tensors[index].gname} "
                f"(after up to {self.max_retries} retries): {type(e).__name__}: {first}"
            ) from None
        self.bytes_in_flight -= self._cost(t)
        return data, crc

    def write(
        self,
        w: _Writer | DirectFile,
        journal: Journal,
        progress: bool,
        on_tensor: Callable[[str, int, int], None] | None,
    ) -> None:
        """The tensors in order into `w`: the GGUF writer, or (DirectFile) the file the tasks
        write into themselves, where only the driver's own tensors are written here."""
        plan = self.plan
        direct = w if isinstance(w, DirectFile) else None
        self.plan_ref = self.ray.put(plan)
        for i, job in enumerate(plan.tensors):
            if job.gname not in journal.done:
                self.queue.extend(self.tasks[i])
                at = direct.offsets[job.gname] if direct is not None else 0
                for t in self.tasks[i]:
                    if direct is not None:
                        self.targets[id(t)] = (os.fspath(direct.path), at)
                    at += t.out_bytes
        total_bytes = sum(tensor_nbytes(t.shape, t.qtype) for t in plan.tensors)
        bar = _progress_bar(progress, total_bytes, f"convert {plan.recipe.name} (ray)")
        n = len(plan.tensors)
        # a writer thread puts each tensor into the GGUF file and the side file while this one
        # waits for the next results; at most `depth` finished tensors wait for it
        depth = 2
        pending: queue.Queue[Any] = queue.Queue(maxsize=depth)
        failed: list[BaseException] = []

        def writer() -> None:
            while (item := pending.get()) is not None:
                if failed:
                    continue  # drain, so that the producer never blocks
                i, job, data, parts = item
                try:
                    if direct is not None:  # the tasks' bytes are in the file already
                        if data is not None:
                            direct.write(job.gname, data)
                    else:
                        w.write_tensor_data(data, raw_shape=job.shape, raw_dtype=job.qtype)
                        if journal.keeps_records:  # the bytes reach the file before their record
                            w.flush()
                    journal.add(job.gname, data, parts)  # resumed ones too: now in this file
                    if bar is not None:
                        bar.update(sum(n for n, _ in parts) if data is None else data.nbytes)
                        bar.set_postfix_str(f"{i + 1}/{n} tensors", refresh=False)
                    if on_tensor is not None:
                        on_tensor(job.gname, i + 1, n)
                except BaseException as e:  # handed to the producer, raised there
                    failed.append(e)

        thread = threading.Thread(target=writer, name="ferroquant-gguf-writer", daemon=True)
        thread.start()
        try:
            for i, job in enumerate(plan.tensors):
                if failed:
                    break
                parts: list[tuple[int, int]] | None = None
                if job.gname in journal.done:
                    data, parts = journal.read(job.gname)
                elif job.hf_name is None:
                    data = as_bytes(plan.extra[job.gname])
                elif direct is not None:  # written by the tasks: their sizes and crc32s
                    parts = []
                    for t in self.tasks[i]:
                        nbytes, crc = self._next_result(i)
                        if nbytes != t.out_bytes:
                            raise ValueError(f"{job.gname}: a task wrote {nbytes} bytes, not "
                                             f"{t.out_bytes}")  # fmt: skip
                        parts.append((t.out_bytes, crc))
                    data = None
                elif len(self.tasks[i]) == 1:
                    data, crc = self._next_result(i)
                    parts = [(data.nbytes, crc)]
                else:  # row ranges, assembled in order
                    data = np.empty(sum(t.out_bytes for t in self.tasks[i]), np.uint8)
                    parts, at = [], 0
                    for _ in self.tasks[i]:
                        part, crc = self._next_result(i)
                        data[at : at + part.nbytes] = part
                        at += part.nbytes
                        parts.append((part.nbytes, crc))
                        del part
                pending.put((i, job, data, parts))
                del data
        finally:
            pending.put(None)
            thread.join()
            if bar is not None:
                bar.close()
        if failed:
            raise failed[0]


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    """A tqdm bar of bytes written (throughput as bytes/s), or None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
