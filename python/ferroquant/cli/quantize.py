"""`ferroquant quantize`: requantize a GGUF file, as llama-quantize does."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from .._extras import require

QTYPE_HELP = "f32, f16, bf16, a llama.cpp file type (q4_k_m, q5_k_m, q8_0, ...) or a ggml qtype"


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="requantize a GGUF file")
    q.add_argument("input", help="the GGUF file to read")
    q.add_argument("out", help="the GGUF file to write (replaced atomically)")
    q.add_argument("--qtype", required=True, help=QTYPE_HELP)
    q.add_argument(
        "--imatrix",
        default=None,
        metavar="FILE",
        help="importance matrix (llama.cpp's GGUF or legacy .dat) for every quantizer that "
        "takes one",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=run)


def summary_line(path: str | os.PathLike[str]) -> str:
    """One line on a written GGUF file: its size, bits per weight and the qtypes used."""
    from .. import gguf

    with gguf.open(path) as f:
        counts = Counter(t.qtype for t in f.tensors.values())
        weights = sum(t.n_elements for t in f.tensors.values())
        data_bytes = sum(t.nbytes for t in f.tensors.values())
        size = f.file_size
        n_tensors = len(f.tensors)
    kinds = ", ".join(f"{q} x{n}" for q, n in counts.most_common())
    bpw = 8 * data_bytes / max(weights, 1)
    return (
        f"wrote {path}: {size / 1e6:.1f} MB, {n_tensors} tensors, {bpw:.3f} bits/weight ({kinds})"
    )


def run(args: argparse.Namespace) -> int:
    src = Path(args.input)
    if not src.is_file():
        raise FileNotFoundError(f"no such GGUF file: {src}")
    require("gguf", "ferroquant quantize", "hf")
    from ..models.convert import quantize_gguf

    imatrix = None
    if args.imatrix is not None:
        from ..methods.imatrix_io import read_imatrix

        imatrix = read_imatrix(args.imatrix)
    quantize_gguf(src, args.out, args.qtype, progress=not args.quiet, imatrix=imatrix)
    print(summary_line(args.out))
    return 0
