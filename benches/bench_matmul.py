"""Quantized CPU matmul y = x · Wᵀ: ferroquant's kernels against torch's float32 and bfloat16
F.linear and against the machine's multi-threaded memory read bandwidth, in one run.

    python benches/bench_matmul.py                 # 4096x14336 and 14336x4096, M 1 8 64 512
    python benches/bench_matmul.py --m 1 --qtypes q4_0,q4_k
    python benches/bench_matmul.py --m 1 --qtypes all      # every qtype with a kernel
    python benches/bench_matmul.py --shapes 576x576,576x192,576x1536,1536x576 --m 128,512 \
        --threads 1 --cpu-time --rotate-mb 64     # SmolLM2-135M's Linear shapes (issue #19)

K x N = in x out features (Llama-3-8B ffn shapes). Every backend rotates over copies of its
weights that together exceed --rotate-mb (default 640 MB, over twice the 300 MiB last-level
cache), so each call reads its weights from memory, not from cache. Weights: a 512-row slab
quantized by fq.quantize (int8, fp8: per-row scales) and tiled to N rows (the kernels have no
data-dependent branches, so timing does not depend on the values).
Effective GB/s = weight bytes (data + statistics) / time. The read bandwidth is a
multi-threaded streaming read of a 1 GiB buffer (`_native.stream_read`: each thread sums the
8-byte words of its contiguous part with AVX-512 loads, loads only), the best over several
probes (1-8 streams a thread, with and without software prefetch; PROBES) within a run, timed
like the kernels (CPU time with --cpu-time); the old probe (8-byte loads, sessions up to 13)
and torch's sum over 1 GiB of float32 (both under-read) are printed beside it. Threads:
ferroquant's pool and torch both use --threads (default: all cores).

Dispatch: ferroquant's kernel runs as QuantLinear runs it: on torch's OpenMP team
(`qmatmul(..., openmp=True)`, ferroquant.nn.openmp.torch_team(); FERROQUANT_OPENMP=off turns it
off there too), so torch's spin-waiting OpenMP workers take our tasks instead of competing with a
second pool. --pool times it on ferroquant's rayon pool instead (the way a caller without torch
runs it), --no-torch imports no torch at all (rayon pool, no torch peers). The header line says
which. --pool-rows adds, per format, "fq <qtype> pool": the same calls on the rayon pool,
interleaved with the team's in the same run (the A/B of the two dispatches). --one-by-one adds
"fq <qtype> 1by1": M = 1 with the threads' tasks claimed one by one (FERROQUANT_M1_RUNS=0)
instead of a contiguous run of rows a thread (the A/B of the two splits in one run).
--tiles32 adds, per 32-weight format, "fq <qtype> gemm" (FERROQUANT_TILES32=0: the AVX-512 GEMM at
every M) and "fq <qtype> tiles" (FERROQUANT_TILES32=4: the AMX int8 tiles from 4 rows), interleaved
in the same run: where they cross is `gemm_amx::min_m` (add FERROQUANT_GGML_BF16=0 to the run's
environment for M >= 48, where the bf16 route takes over by default).

--cpu-time (with --threads 1): every call is timed by the calling thread's CPU time
(`time.thread_time`) instead of the wall clock. With one thread ferroquant computes on the
calling thread and torch runs its kernel inline, so on a machine shared with other jobs this
counts each engine's own compute and not the time it waited for a core (caches and memory are
still shared). Ratios of such runs compare the kernels on one core; they are no measure of
the two-thread wall time.

--k-paths: each K-quant (K_QUANTS) is also timed on each of its three paths, "fq <qtype> vnni"
(the AVX-512 VNNI GEMM), "tiles" (the AMX int8 tiles) and "route" (the ggml bf16 route), each
forced from 8 rows (K_PATHS), interleaved in the same run: the data of `k_route.rs`'s table in
one process. Where AVX-512 VNNI or AMX is missing the three rows run the same kernels.

--ggml-int8: each ggml format that takes the bf16 GEMM on AMX tiles at large M
(`_native.qmatmul_bf16_ggml_min_m(qtype, k)`) is also timed as "fq <qtype> int8" with
FERROQUANT_GGML_BF16=0 (its int8 paths at every M), interleaved in the same run: the A/B of the
two paths and where they cross (with FERROQUANT_GGML_BF16=8 set for the run, the tiles from 8
rows on: the small-M tiles to 16 rows, then the big tile loop).

--ab-rounds R (the sturdier ratio to torch bf16; `benches/ab_rounds.py`): each cell (shape, M,
format) is timed in R rounds, each round our call and torch bf16's F.linear back to back (order
swapped every round; each a measurement of --budget seconds), and the cell prints the median of
the per-round ratios torch time / ours with their range (no read probe; --ab-peer f32 takes torch's
float32 F.linear as the peer instead, for CPUs without native bf16, where torch bf16 is slow). With
--processes P the whole run is repeated in P fresh processes in turn and their rounds pooled
(plus the range of the per-process medians); --libs A,B alternates the processes' PYTHONPATH over
those libraries (e.g. a branch's python/ and main's) and adds each cell's median ratio over the
first library's: an A/B of two builds with torch as every round's yardstick. E.g.
    python benches/bench_matmul.py --m 512 --qtypes q4_0,nf4 --threads 1 --cpu-time \
        --ab-rounds 5 --budget 0.3 --processes 4 --libs /work/wt/python,/work/main/python

Runs: each of --runs runs measures every backend (and the read bandwidth) once, in turn
(benchlib.interleave; a backend's weight copies are made at its turn and freed after it); a
measurement is the median of the calls in --budget seconds. Each row prints the median (min-max)
over the runs, and ratios of medians against torch's f32 and bf16 F.linear. The machine this
runs on may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time

import ab_rounds
import benchlib
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ferroquant as fq  # noqa: E402
from ferroquant import _native  # noqa: E402

SHAPES = ((4096, 14336), (14336, 4096))  # (K, N)
QTYPES = ("q4_0", "q5_0", "q8_0", "iq4_nl", "q4_k", "q5_k", "q6_k", "nf4", "int8")
SLAB_ROWS = 512
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")
# --k-paths: each K-quant forced onto one path at every M from 8 rows (docs/configuration.md;
# rust/core/src/matmul/k_route.rs has the measured table these rows feed). The three differ
# only where AVX-512 VNNI (vnni), AMX int8 (tiles) and AMX bf16 (route) run: elsewhere all
# three are the same AVX2 / row kernels, and the header's "kernels" and "amx" say so.
K_PATHS = {
    "vnni": {"FERROQUANT_K_TILES": "0", "FERROQUANT_GGML_BF16": "0"},
    "tiles": {"FERROQUANT_K_TILES": "4", "FERROQUANT_GGML_BF16": "0"},
    "route": {"FERROQUANT_K_TILES": "0", "FERROQUANT_GGML_BF16": "8"},
}
# The formats of the AVX-512 GEMM that take the AMX int8 tiles from gemm_amx::min_m (--tiles32).
TILES32 = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl")


def slab(qtype: str, k: int, rng: np.random.Generator):
    """(data per row as uint8 (rows, bytes), stats per row (rows, s) or None, block, mode)."""
    w = rng.standard_normal((SLAB_ROWS, k)).astype(np.float32)
    kw = {"scale_mode": "row"} if qtype in ("int8", "fp8_e4m3", "fp8_e5m2") else {}
    qt = fq.quantize(w, qtype, **kw)
    stats = qt.stats.reshape(SLAB_ROWS, -1) if qt.stats.size else None
    return qt.data.reshape(SLAB_ROWS, -1), stats, qt.block_size, qt.scale_mode


def ggml_bf16_min_m(qtype: str, k: int) -> int:
    """`_native.qmatmul_bf16_ggml_min_m(qtype, k)`; a library from before session 17 (one
    threshold for every K) takes the qtype alone, so A/B runs against main's build work."""
    try:
        return _native.qmatmul_bf16_ggml_min_m(qtype, k)
    except TypeError:
        return _native.qmatmul_bf16_ggml_min_m(qtype)  # type: ignore[call-arg]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'576x576,576x192' -> [(576, 576), (576, 192)] (K x N)."""
    out = []
    for item in text.split(","):
        k, sep, n = item.strip().partition("x")
        if not sep or not k.isdigit() or not n.isdigit():
            raise SystemExit(f"--shapes: {item!r} is not KxN (e.g. 576x192)")
        out.append((int(k), int(n)))
    return out


def tile_rows(a: np.ndarray, n: int) -> np.ndarray:
    reps = math.ceil(n / a.shape[0])
    return np.ascontiguousarray(np.tile(a, (reps, 1))[:n]).reshape(-1)


def n_copies(nbytes: int, rotate_mb: int) -> int:
    return max(2, math.ceil(rotate_mb * 1e6 / nbytes) + 1)


CLOCK = time.perf_counter  # time.thread_time with --cpu-time


def time_calls(fn, copies: list, budget_s: float) -> float:
    """Median seconds per call, each call on the next copy (never one used just before)."""
    fn(copies[-1])  # warm-up (page faults, thread start)
    times = []
    start = time.perf_counter()
    i = 0
    while i < len(copies) and (i < 3 or time.perf_counter() - start < budget_s):
        t0 = CLOCK()
        fn(copies[i])
        times.append(CLOCK() - t0)
        i += 1
    return float(np.median(times))


# The probes read_bandwidth takes the best of: (512-bit loads, streams a thread, prefetch bytes
# ahead); see rust/core/src/matmul/bandwidth.rs and docs/cpu-gemm.md.
PROBES = ((True, 1, 0), (True, 2, 0), (True, 2, 1024), (True, 4, 1024), (True, 4, 4096),
          (True, 8, 0))  # fmt: skip


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> tuple[float, float]:
    """GB/s of a streaming read of a 1 GiB buffer (over 3x the 300 MiB last-level cache):
    `_native.stream_read`, each thread of ferroquant's pool (`threads` of them) one contiguous
    part, loads only; the best over PROBES (AVX-512 loads, 1-8 streams a thread, with and
    without software prefetch) of each one's best of 3, after one pass that faults the pages
    in. Timed by CLOCK (with --cpu-time the probe runs on the calling thread). Also returns
    the old probe's figure (8-byte loads, one stream; sessions up to 13), for comparison."""
    fq.set_num_threads(threads)
    a = np.ones(nbytes, dtype=np.uint8)
    _native.stream_read(a)

    def best(vector: bool, streams: int, ahead: int) -> float:
        t = float("inf")
        for _ in range(3):
            t0 = CLOCK()
            try:
                _native.stream_read(a, streams=streams, ahead=ahead, vector=vector)
            except TypeError:  # a build before the probes (an A/B against an older library)
                _native.stream_read(a)
            t = min(t, CLOCK() - t0)
        return nbytes / t / 1e9

    return max(best(*p) for p in PROBES), best(False, 1, 0)


def torch_sum_bandwidth(threads: int) -> float:
    """The old reference, kept for comparison: torch's sum over 1 GiB of float32."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    a.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best / 1e9


@contextlib.contextmanager
def benchlib_env(env: dict[str, str]):
    """The environment variables `env` set for the duration (the Rust core reads
    FERROQUANT_AVX2_GEMM, FERROQUANT_GGML_BF16, FERROQUANT_TILES32 and FERROQUANT_M1_RUNS at
    every call)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ab_round_times(ours, copies, peer, peer_copies, rounds: int, budget: float):
    """`rounds` rounds of `ours(data, stats)` on `copies` and `peer(w)` on `peer_copies`, back
    to back (ours first in even rounds); their times per round."""
    import torch

    a, b = [], []
    for r in range(rounds):
        for who in (0, 1) if r % 2 == 0 else (1, 0):
            if who == 0:
                a.append(time_calls(lambda c: ours(*c), copies, budget))
            else:
                with torch.inference_mode():
                    b.append(time_calls(peer, peer_copies, budget))
    return a, b


def ab_cells(args, shapes, qtypes, ms, team) -> list[dict]:
    """--ab-rounds: per cell `args.ab_rounds` rounds of our call and torch's (`--ab-peer`) back
    to back (the order swapped every round), weights rotated as in the default mode; the cells'
    times."""
    import torch
    import torch.nn.functional as F

    dt = torch.bfloat16 if args.ab_peer == "bf16" else torch.float32
    rng = np.random.default_rng(0)  # the default mode's draws, in its order
    cells = []
    for k, n in shapes:
        s = f"{k}x{n}"
        x_by_m = {m: rng.standard_normal((m, k)).astype(np.float32) for m in ms}
        w = torch.from_numpy(rng.standard_normal((SLAB_ROWS, k)).astype(np.float32))
        w = w.repeat(math.ceil(n / SLAB_ROWS), 1)[:n].to(dt).contiguous()
        tcopies = [w.clone() for _ in range(n_copies(w.numel() * w.element_size(), args.rotate_mb))]
        del w
        for q in qtypes:
            try:
                data, stats, block, mode = slab(q, k, rng)
            except ValueError as e:
                print(f"  {s} {q}: skipped ({e})", file=sys.stderr)
                continue
            data = tile_rows(data, n)
            stats = tile_rows(stats, n) if stats is not None else None
            size = data.nbytes + (stats.nbytes if stats is not None else 0)
            copies = [(data.copy(), stats.copy() if stats is not None else None)
                      for _ in range(n_copies(size, args.rotate_mb))]  # fmt: skip
            for m, x in x_by_m.items():
                xt = torch.from_numpy(x).to(dt)

                def call(data, stats, x=x, q=q, n=n, k=k, block=block, mode=mode):
                    return _native.qmatmul(x, data, q, n, k, block, stats, mode, openmp=team)

                a, b = ab_round_times(call, copies, functools.partial(F.linear, xt), tcopies,
                                      args.ab_rounds, args.budget)  # fmt: skip
                cells.append({"shape": s, "m": m, "backend": f"fq {q}", "ours": a, "peer": b})
                med = ab_rounds.summary(ab_rounds.round_ratios(a, b))
                print(f"  {s} M={m} fq {q}: {benchlib.med(a) * 1e3:.2f} ms, torch {args.ab_peer} "
                      f"{benchlib.med(b) * 1e3:.2f} ms, x torch {med[0]:.3f} "
                      f"({med[1]:.3f}-{med[2]:.3f})", file=sys.stderr, flush=True)  # fmt: skip
            del copies
        del tcopies
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,8,64,512", help="comma-separated batch sizes M")
    ap.add_argument(
        "--qtypes",
        default=",".join(QTYPES),
        help="comma-separated qtypes with a kernel (_native.qmatmul_qtypes()), or 'all'",
    )
    ap.add_argument(
        "--shapes",
        default="all",
        help="'all' (4096x14336 and 14336x4096) or comma-separated KxN shapes, e.g. 576x192",
    )
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--rotate-mb", type=int, default=640)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per measurement")
    benchlib.add_runs(ap, 3)
    ap.add_argument(
        "--no-torch", action="store_true", help="no torch peers, torch not imported (rayon pool)"
    )
    ap.add_argument(
        "--pool", action="store_true", help="our kernel on the rayon pool, not torch's OpenMP team"
    )
    ap.add_argument(
        "--pool-rows", action="store_true", help="each format also on the rayon pool ('pool')"
    )
    ap.add_argument(
        "--cpu-time", action="store_true", help="time calls by thread CPU time (--threads 1)"
    )
    ap.add_argument(
        "--avx2-rows",
        action="store_true",
        help="also time each format with FERROQUANT_AVX2_GEMM=0 (the row kernels instead of "
        "the AVX2 GEMM; run with FERROQUANT_MAX_ISA=avx2 or avxvnni)",
    )
    ap.add_argument(
        "--one-by-one",
        action="store_true",
        help="also time each format with FERROQUANT_M1_RUNS=0 ('1by1': at M = 1 the threads "
        "claim tasks one by one from a shared counter, the split before session 17, instead "
        "of a contiguous run of rows each)",
    )
    ap.add_argument(
        "--ggml-int8",
        action="store_true",
        help="also time each ggml format with FERROQUANT_GGML_BF16=0 ('int8': its int8 paths "
        "instead of the bf16 GEMM on AMX tiles, which it takes from "
        "_native.qmatmul_bf16_ggml_min_m(qtype, k) rows)",
    )
    ap.add_argument(
        "--ab-rounds",
        type=int,
        default=0,
        help="per cell R rounds of ours and torch bf16 back to back; the median per-round ratio",
    )
    ap.add_argument(
        "--processes", type=int, default=0, help="with --ab-rounds: P fresh processes, pooled"
    )
    ap.add_argument(
        "--libs", default="", help="with --processes: PYTHONPATHs the processes alternate over"
    )
    ap.add_argument(
        "--ab-peer", choices=("bf16", "f32"), default="bf16", help="--ab-rounds: torch's dtype"
    )
    ap.add_argument("--ab-json", default="", help=argparse.SUPPRESS)  # a child's rounds
    ap.add_argument(
        "--k-paths",
        action="store_true",
        help="also time each K-quant on each of its three GEMM paths ('vnni': the AVX-512 VNNI "
        "GEMM, 'tiles': the AMX int8 tiles, 'route': the ggml bf16 route; K_PATHS)",
    )
    ap.add_argument(
        "--tiles32",
        action="store_true",
        help="also time each 32-weight format (q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl) with "
        "FERROQUANT_TILES32=0 ('gemm': the AVX-512 GEMM at every M) and =4 ('tiles': the AMX "
        "int8 tiles from 4 rows), to place gemm_amx::min_m (where AMX int8 is usable)",
    )
    args = ap.parse_args()
    if (args.processes or args.libs) and not args.ab_rounds:
        ap.error("--processes / --libs need --ab-rounds")
    if args.processes:
        libs = [v for v in args.libs.split(",") if v]
        return ab_rounds.run_processes(__file__, sys.argv[1:], args.processes, libs)
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time needs --threads 1 (the calling thread does all the work)")
        global CLOCK
        CLOCK = time.thread_time

    load_start = benchlib.load()
    threads = args.threads or os.cpu_count() or 1
    fq.set_num_threads(threads)
    team = False  # qmatmul(openmp=team)
    if not args.no_torch:
        import torch
        import torch.nn.functional as F

        from ferroquant.nn.openmp import torch_team

        torch.set_num_threads(threads)
        team = not args.pool and torch_team()
    dispatch = (
        "our kernel on torch's OpenMP team (as QuantLinear runs it)" if team
        else "our kernel on ferroquant's rayon pool"
        + (" (--pool)" if args.pool else "; torch not loaded" if args.no_torch
           else "; torch's team could not be attached")
    )  # fmt: skip
    if args.pool_rows and team:
        dispatch += "; 'pool' rows: the same calls on the rayon pool"
    ms = [int(v) for v in args.m.split(",")]
    qtypes = [q for q in args.qtypes.split(",") if q]
    if qtypes == ["all"]:
        qtypes = list(_native.qmatmul_qtypes())
    shapes = SHAPES if args.shapes == "all" else parse_shapes(args.shapes)
    if args.ab_rounds:
        if args.no_torch:
            ap.error("--ab-rounds times torch bf16")
        clock = "; times: the calling thread's CPU time" if args.cpu_time else ""
        rounds = f"{args.ab_rounds} rounds of {args.budget} s a measurement{clock}"
        header = (f"ferroquant {fq.__version__} from {os.path.dirname(fq.__file__)}, kernels "
                  f"{benchlib.ours_isa()}; torch {torch.__version__}; {threads} threads; "
                  f"{dispatch}; {rounds}")  # fmt: skip
        cells = ab_cells(args, shapes, qtypes, ms, team)
        proc = {"header": header, "peer": f"torch {args.ab_peer}", "cells": cells}
        return ab_rounds.report_one(proc, args.ab_json)
    rng = np.random.default_rng(0)
    engines = {"read bw": lambda: read_bandwidth(threads)}
    nbytes = {}  # (shape, backend) -> weight bytes

    def torch_engine(w, xs):
        def run() -> dict[int, float]:
            copies = [w.clone() for _ in range(n_copies(w.numel() * w.element_size(),
                                                          args.rotate_mb))]  # fmt: skip
            out = {}
            with torch.inference_mode():
                for m, xt in xs.items():
                    out[m] = time_calls(lambda c, xt=xt: F.linear(xt, c), copies, args.budget)
            return out

        return run

    def fq_engine(q, k, n, data, stats, block, mode, xs, env=None, openmp=None):
        on_team = team if openmp is None else openmp

        def run() -> dict[int, float]:
            with benchlib_env(env or {}):
                return measure()

        def measure() -> dict[int, float]:
            size = data.nbytes + (stats.nbytes if stats is not None else 0)
            copies = [(data.copy(), stats.copy() if stats is not None else None)
                      for _ in range(n_copies(size, args.rotate_mb))]  # fmt: skip
            out = {}
            for m, x in xs.items():

                def call(c, x=x):
                    return _native.qmatmul(x, c[0], q, n, k, block, c[1], mode, openmp=on_team)

                out[m] = time_calls(call, copies, args.budget)
            return out

        return run

    for k, n in shapes:
        s = f"{k}x{n}"
        x_by_m = {m: rng.standard_normal((m, k)).astype(np.float32) for m in ms}
        if not args.no_torch:
            w32 = torch.from_numpy(rng.standard_normal((SLAB_ROWS, k)).astype(np.float32))
            w32 = w32.repeat(math.ceil(n / SLAB_ROWS), 1)[:n].contiguous()
            for name, dt in (("torch f32", torch.float32), ("torch bf16", torch.bfloat16)):
                w = w32.to(dt)
                nbytes[s, name] = w.numel() * w.element_size()
                xs = {m: torch.from_numpy(x).to(dt) for m, x in x_by_m.items()}
                engines[f"{s} {name}"] = torch_engine(w, xs)
            del w32
        for q in qtypes:
            try:
                data, stats, block, mode = slab(q, k, rng)
            except ValueError as e:  # e.g. a K-quant at K = 576 (its recipe falls back)
                print(f"  {s} {q}: skipped ({e})", file=sys.stderr)
                continue
            data = tile_rows(data, n)
            stats = tile_rows(stats, n) if stats is not None else None
            nbytes[s, f"fq {q}"] = data.nbytes + (stats.nbytes if stats is not None else 0)
            engines[f"{s} fq {q}"] = fq_engine(q, k, n, data, stats, block, mode, x_by_m)
            if args.pool_rows and team:
                nbytes[s, f"fq {q} pool"] = nbytes[s, f"fq {q}"]
                engines[f"{s} fq {q} pool"] = fq_engine(
                    q, k, n, data, stats, block, mode, x_by_m, openmp=False
                )
            if args.ggml_int8 and ggml_bf16_min_m(q, k):
                nbytes[s, f"fq {q} int8"] = nbytes[s, f"fq {q}"]
                engines[f"{s} fq {q} int8"] = fq_engine(
                    q, k, n, data, stats, block, mode, x_by_m, {"FERROQUANT_GGML_BF16": "0"}
                )
            if args.tiles32 and q in TILES32:
                for label, v in (("gemm", "0"), ("tiles", "4")):
                    nbytes[s, f"fq {q} {label}"] = nbytes[s, f"fq {q}"]
                    engines[f"{s} fq {q} {label}"] = fq_engine(
                        q, k, n, data, stats, block, mode, x_by_m, {"FERROQUANT_TILES32": v}
                    )
            if args.one_by_one:
                nbytes[s, f"fq {q} 1by1"] = nbytes[s, f"fq {q}"]
                engines[f"{s} fq {q} 1by1"] = fq_engine(
                    q, k, n, data, stats, block, mode, x_by_m, {"FERROQUANT_M1_RUNS": "0"}
                )
            if args.k_paths and q in K_QUANTS:
                for name, env in K_PATHS.items():
                    nbytes[s, f"fq {q} {name}"] = nbytes[s, f"fq {q}"]
                    engines[f"{s} fq {q} {name}"] = fq_engine(
                        q, k, n, data, stats, block, mode, x_by_m, env
                    )
            if args.avx2_rows:
                nbytes[s, f"fq {q} rows"] = nbytes[s, f"fq {q}"]
                engines[f"{s} fq {q} rows"] = fq_engine(
                    q, k, n, data, stats, block, mode, x_by_m, {"FERROQUANT_AVX2_GEMM": "0"}
                )

    def progress(name, fn):
        def run():
            r = fn()
            shown = r if isinstance(r, tuple) else {m: round(t * 1e3, 3) for m, t in r.items()}
            print(f"  {name}: {shown}", file=sys.stderr, flush=True)
            return r

        return run

    res = benchlib.interleave({k: progress(k, v) for k, v in engines.items()}, args.runs)
    bw = [r[0] for r in res["read bw"]]
    bw_old = [r[1] for r in res.pop("read bw")]
    bw_torch = None if args.no_torch else torch_sum_bandwidth(threads)
    rows = []
    for (s, backend), size in nbytes.items():
        for m in ms:
            t = [r[m] for r in res[f"{s} {backend}"]]
            gbs = [size / v / 1e9 for v in t]
            vs = []
            for peer in ("torch f32", "torch bf16"):
                key = f"{s} {peer}"
                vs.append(benchlib.ratio(t, [r[m] for r in res[key]], False) if key in res else "-")
            pct = f"{100 * benchlib.med(gbs) / benchlib.med(bw):.0f}%"
            rows.append((s, m, backend, benchlib.spread([v * 1e3 for v in t], ".3f"),
                         benchlib.spread(gbs), *vs, pct))  # fmt: skip
    print(f"\nbench_matmul: {benchlib.machine()} (at the start: {load_start})")
    torch_v = "no torch" if args.no_torch else f"torch {torch.__version__}"
    print(f"ferroquant {fq.__version__}, kernels {benchlib.ours_isa()}; {torch_v}; "
          f"{threads} threads; {dispatch}; weights rotated over copies > {args.rotate_mb} MB"
          + ("; times: the calling thread's CPU time" if args.cpu_time else "")
          + (f"; amx: {_native.amx_status()}" if args.k_paths else ""))  # fmt: skip
    print(f"read bandwidth (stream_read, 1 GiB, {threads} threads, best probe): "
          f"{benchlib.spread(bw)} GB/s; the old 8-byte probe {benchlib.spread(bw_old)} GB/s"
          + ("" if bw_torch is None else
             f" (torch sum of 1 GiB f32, after the runs: {bw_torch:.1f} GB/s)"))  # fmt: skip
    print(f"median (min-max) of {args.runs} runs, backends interleaved; 'vs': how many times "
          "faster than torch's F.linear (medians);\n'% read bw': median GB/s / median read "
          "bandwidth")  # fmt: skip
    head = ("K x N", "M", "backend", "time ms", "GB/s", "vs f32", "vs bf16", "% read bw")
    print(benchlib.table(head, rows))


if __name__ == "__main__":
    main()
