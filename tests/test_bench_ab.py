"""benches/ab_rounds.py's arithmetic (bench_matmul.py --ab-rounds / --processes / --libs): the
per-round ratios, their pooling over processes and libraries, the table rows, and the option
stripping for the child processes. Synthetic times only: nothing is timed here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import ab_rounds  # noqa: E402


def test_round_ratios_are_peer_over_ours_per_round():
    # Round 2 is twice as slow for both: its ratio is round 1's, which medians of the two
    # engines' times apart would not show.
    assert ab_rounds.round_ratios([2.0, 4.0, 1.0], [3.0, 6.0, 2.0]) == [1.5, 1.5, 2.0]
    with pytest.raises(ValueError):
        ab_rounds.round_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        ab_rounds.round_ratios([], [])


def test_median_of_ratios_is_not_ratio_of_medians():
    ours, peer = [1.0, 2.0, 10.0], [2.0, 1.0, 9.0]
    med, lo, hi = ab_rounds.summary(ab_rounds.round_ratios(ours, peer))
    assert (med, lo, hi) == (0.9, 0.5, 2.0)
    assert med != pytest.approx(2.0 / 2.0)  # median(peer) / median(ours) would say 1.0


def _proc(lib, ours, peer, m=512):
    return {"lib": lib, "cells": [{"shape": "4096x14336", "m": m, "backend": "fq q4_0",
                                   "ours": ours, "peer": peer}]}  # fmt: skip


def test_merge_pools_rounds_and_keeps_per_process_medians():
    cells = ab_rounds.merge([_proc("", [1.0, 1.0], [1.0, 2.0]), _proc("", [2.0, 2.0], [1.0, 1.0])])
    (key, c), *rest = cells.items()
    assert not rest and key == ("", "4096x14336", 512, "fq q4_0")
    assert c["ratios"] == [1.0, 2.0, 0.5, 0.5]
    assert c["per_process"] == [1.5, 0.5]
    row = ab_rounds.rows(cells)[0]
    assert row[6] == "0.750x (0.500-2.000)" and row[7] == "0.50-1.50" and row[8] == 4
    assert row[9] == "-"


def test_libraries_apart_and_against_the_first():
    procs = [_proc("main", [2.0], [2.0]), _proc("branch", [1.0], [2.0]),
             _proc("main", [2.0], [2.0]), _proc("branch", [1.6], [2.0])]  # fmt: skip
    rows = ab_rounds.rows(ab_rounds.merge(procs))
    assert [r[3] for r in rows] == ["main", "branch"]
    # branch: ratios 2.0 and 1.25, median 1.625, over main's 1.0
    assert rows[0][9] == "-" and rows[1][9] == "1.625"


def test_strip_option_removes_the_parents_options_only():
    argv = ["--m", "512", "--processes", "4", "--libs=a,b", "--ab-rounds", "3", "--ab-json", "x"]
    assert ab_rounds.strip_option(argv, ("--processes", "--libs", "--ab-json")) == [
        "--m",
        "512",
        "--ab-rounds",
        "3",
    ]
