"""`ferroquant bench`: a quick look at this machine's throughput — quantization per format and,
with torch installed, the quantized CPU matmul at one token against torch's bf16 F.linear.
The full side-by-side benchmarks against the peers live in the repository's benches/."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _native
from ..tensor import quantize

DEFAULT_QTYPES = ("q8_0", "q4_0", "q4_k", "q6_k", "iq4_nl", "nf4", "int8", "fp8_e4m3")


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(
    rows: int = 1024, cols: int = 4096, qtypes: tuple[str, ...] = DEFAULT_QTYPES, repeat: int = 3
) -> list[dict[str, Any]]:
    """One row per qtype: quantize weights/s, and matmul (M=1) time and ratio to torch bf16."""
    x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    out = []
    try:
        import torch
    except ImportError:
        torch = None
    bf16_ms = None
    if torch is not None:
        w = torch.from_numpy(x).to(torch.bfloat16)
        v = torch.randn(1, cols, dtype=torch.bfloat16)
        bf16_ms = _best(lambda: torch.nn.functional.linear(v, w), repeat * 5) * 1e3
    act = np.random.default_rng(1).standard_normal((1, cols), dtype=np.float32)
    kernels = set(_native.qmatmul_qtypes())
    for q in qtypes:
        t = _best(lambda q=q: quantize(x, q), repeat)
        row: dict[str, Any] = {"qtype": q, "quantize_mw_s": x.size / t / 1e6}
        if q in kernels:
            qt = quantize(x, q)
            ms = (
                _best(
                    lambda qt=qt: _native.qmatmul(
                        act, qt.data, qt.qtype, rows, cols, qt.block_size, qt.stats, qt.scale_mode
                    ),
                    repeat * 5,
                )
                * 1e3
            )
            row["matmul_m1_ms"] = ms
            row["vs_torch_bf16"] = bf16_ms / ms if bf16_ms else None
        out.append(row)
    return out


def format_table(rows: list[dict[str, Any]], shape: tuple[int, int]) -> str:
    lines = [
        f"ferroquant bench: {shape[0]}x{shape[1]} float32, {_native.num_threads()} threads, "
        f"simd {_native.kernel_simd_level()} (weights resident in cache: see benches/ for the "
        "cache-busting comparisons)",
        f"{'qtype':<10} {'quantize Mw/s':>14} {'matmul M=1 ms':>14} {'vs torch bf16':>14}",
    ]
    for r in rows:
        mm = f"{r['matmul_m1_ms']:14.3f}" if "matmul_m1_ms" in r else f"{'-':>14}"
        ratio = f"{r['vs_torch_bf16']:13.2f}x" if r.get("vs_torch_bf16") else f"{'-':>14}"
        lines.append(f"{r['qtype']:<10} {r['quantize_mw_s']:14.1f} {mm} {ratio}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="quick throughput of quantization and the CPU matmul",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--rows", type=int, default=1024)
    b.add_argument("--cols", type=int, default=4096)
    b.add_argument("--qtypes", help="comma-separated qtypes (default: a representative set)")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..qtypes import qtype_info

    qtypes = tuple(qtype_info(q).name for q in args.qtypes.split(",")) if args.qtypes else None
    rows = run(args.rows, args.cols, qtypes or DEFAULT_QTYPES)
    if args.json:
        print(json.dumps({"shape": [args.rows, args.cols], "rows": rows}))
    else:
        print(format_table(rows, (args.rows, args.cols)))
    return 0
