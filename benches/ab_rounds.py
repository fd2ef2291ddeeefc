"""`bench_matmul.py --ab-rounds R [--processes P [--libs A,B]]`: the ratio to torch bf16 per round.

A cell (shape, M, format) is timed in R rounds; each round times ferroquant's call and torch bf16's
F.linear back to back (their order swapped every round), and the round's ratio is torch's time /
ours (above 1: ours faster). A cell reports the median of those per-round ratios with their range,
so a slow stretch of the machine moves both times of a round and not the ratio. --processes P runs
the whole measurement in P fresh processes in turn (each writes its rounds as JSON) and pools
their rounds, so no one process's memory layout or luck decides; --libs alternates the processes
over several libraries (PYTHONPATHs: e.g. a branch's and main's `python/`), the A/B of two builds
with torch as the yardstick of every round. This module holds the arithmetic and the children;
nothing here imports ferroquant or torch (tests/test_bench_ab.py checks the arithmetic).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import benchlib


def round_ratios(ours: Sequence[float], peer: Sequence[float]) -> list[float]:
    """Per round: the peer's time / ours (how many times faster ours is in that round)."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"rounds differ or none: {len(ours)} ours, {len(peer)} peer times")
    return [p / o for o, p in zip(ours, peer, strict=True)]


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def merge(processes: Sequence[dict]) -> dict[tuple, dict]:
    """Pool the cells of several processes' JSON (`{"lib": .., "cells": [{"shape", "m",
    "backend", "ours": [s..], "peer": [s..]}]}`), keyed (lib, shape, m, backend): every round's
    times and ratio, and each process's median ratio."""
    out: dict[tuple, dict] = {}
    for proc in processes:
        for c in proc["cells"]:
            key = (proc.get("lib", ""), c["shape"], c["m"], c["backend"])
            cell = out.setdefault(key, {"ours": [], "peer": [], "ratios": [], "per_process": []})
            r = round_ratios(c["ours"], c["peer"])
            cell["ours"] += c["ours"]
            cell["peer"] += c["peer"]
            cell["ratios"] += r
            cell["per_process"].append(statistics.median(r))
    return out


def rows(cells: dict[tuple, dict]) -> list[tuple]:
    """Table rows: per cell the times (ms, median (min-max)), the median of the per-round ratios
    (min-max), the per-process medians' range, the rounds; for a second and later library the
    median ratio over the first library's in the same cell (above 1: that library is faster)."""
    libs = list(dict.fromkeys(k[0] for k in cells))
    out = []
    for (lib, shape, m, backend), c in cells.items():
        med, lo, hi = summary(c["ratios"])
        pp = c["per_process"]
        per_proc = f"{min(pp):.2f}-{max(pp):.2f}" if len(pp) > 1 else "-"
        base = cells.get((libs[0], shape, m, backend))
        vs_first = "-"
        if lib != libs[0] and base is not None:
            vs_first = f"{med / statistics.median(base['ratios']):.3f}"
        ours = benchlib.spread([t * 1e3 for t in c["ours"]], ".2f")
        peer = benchlib.spread([t * 1e3 for t in c["peer"]], ".2f")
        ratio = f"{med:.3f}x ({lo:.3f}-{hi:.3f})"
        out.append(
            (shape, m, backend, lib or "-", ours, peer, ratio, per_proc, len(c["ratios"]), vs_first)
        )
    return out


def head(peer: str = "torch bf16") -> tuple[str, ...]:
    return ("K x N", "M", "backend", "library", "ours ms", f"{peer} ms", f"x {peer} (rounds)",
            "per process", "rounds", "vs first library")  # fmt: skip


def strip_option(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """argv without the options `names` and their values (`--x v` and `--x=v`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def run_processes(script: str, argv: Sequence[str], processes: int, libs: Sequence[str]) -> None:
    """Run `script argv` (which has --ab-rounds) in `processes` fresh processes in turn, process
    i with PYTHONPATH libs[i % len(libs)] (or the inherited one), then print the pooled table."""
    child = strip_option(argv, ("--processes", "--libs", "--ab-json"))
    results = []
    load_start = benchlib.load()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            lib = libs[i % len(libs)] if libs else ""
            env = dict(os.environ)
            if lib:
                env["PYTHONPATH"] = os.pathsep.join([lib, *filter(None, [env.get("PYTHONPATH")])])
            path = os.path.join(tmp, f"p{i}.json")
            which = f" ({lib})" if lib else ""
            print(f"process {i + 1}/{processes}{which}, load {benchlib.load()}", file=sys.stderr)
            subprocess.run([sys.executable, script, *child, "--ab-json", path], env=env, check=True)
            with open(path) as f:
                proc = json.load(f)
            proc["lib"] = lib
            results.append(proc)
    print(f"\nbench_matmul --ab-rounds: {benchlib.machine()} (at the start: {load_start})")
    for i, proc in enumerate(results):
        print(f"process {i + 1}: {proc['header']}")
    peer = results[0].get("peer", "torch bf16")
    print(f"{processes} processes in turn; per cell every round's ratio {peer} time / ours "
          "(back to back, order swapped each round), median (min-max) over all rounds; "
          "'per process': the range of the processes' median ratios")  # fmt: skip
    print(benchlib.table(head(results[0].get("peer", "torch bf16")), rows(merge(results))))


def report_one(proc: dict, json_path: str | None) -> None:
    """One process's rounds: to `json_path` for the parent, else printed as a table."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(proc, f)
        return
    print(f"\nbench_matmul --ab-rounds: {benchlib.machine()}")
    print(proc["header"])
    print(f"per cell every round's ratio {proc.get('peer', 'torch bf16')} time / ours (back to "
          "back, order swapped each round), median (min-max) over the rounds")  # fmt: skip
    print(benchlib.table(head(proc.get("peer", "torch bf16")), rows(merge([proc]))))
