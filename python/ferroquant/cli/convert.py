"""`ferroquant convert`: a Hugging Face llama-family folder -> GGUF, or a .gguf -> HF folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._extras import require
from .quantize import QTYPE_HELP, summary_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert",
        help="a Hugging Face llama-family folder -> GGUF (or a .gguf -> HF folder)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("src", help="a Hugging Face folder, or a .gguf file for the reverse direction")
    c.add_argument("out", help="the GGUF file to write (or the folder, from a .gguf)")
    c.add_argument("--qtype", default="f16", help=QTYPE_HELP)
    c.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype of the HF folder written from a .gguf",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    for module in ("torch", "gguf", "transformers"):
        require(module, "ferroquant convert", "hf")
    from ..models.convert import gguf_to_hf, hf_to_gguf

    if src.suffix.lower() == ".gguf":  # the reverse direction, for inspection
        written = gguf_to_hf(src, args.out, dtype=args.dtype)
        print(f"wrote {', '.join(written)} to {args.out}")
        return 0
    if not src.is_dir():
        raise ValueError(f"{src}: expected a Hugging Face checkpoint folder or a .gguf file")
    hf_to_gguf(src, args.out, args.qtype, progress=not args.quiet)
    print(summary_line(args.out))
    return 0
