"""`ferroquant imatrix`: llama.cpp's importance matrix of a model over a calibration text, in
llama.cpp's GGUF imatrix format (llama-quantize --imatrix and ferroquant --imatrix read it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._extras import require


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "imatrix",
        help="importance matrix (llama.cpp's definition and GGUF format) over a calibration text",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model", nargs="?", default=None, help="HF folder or .gguf (default: SmolLM2-135M)"
    )
    p.add_argument(
        "--text",
        default=None,
        help="calibration text file (default: gensim's lee_background.cor)",
    )
    p.add_argument("-o", "--output", default="imatrix.gguf", help="the imatrix file to write")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    p.add_argument("--chunks", type=int, default=0, help="chunks to run (0: all the text holds)")
    p.add_argument(
        "--process-output", action="store_true", help="also collect the output head's inputs"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|ADDRESS",
        help="run the chunks on a Ray cluster (auto: the running one; or HOST:PORT); same values",
    )
    p.set_defaults(func=run)


def load_float_model(model: str | Path | None) -> tuple[Any, Any, str, int | None]:
    """(float32 transformers model, tokenizer, llama.cpp architecture, BOS id if the vocabulary
    adds one) for an HF folder or a .gguf file."""
    import json

    from ..defaults import resolve_model
    from ..models.convert import ARCHES

    folder, gguf_file = resolve_model(model)
    torch = require("torch", "ferroquant imatrix", "hf")
    transformers = require("transformers", "ferroquant imatrix", "hf")
    require("gguf", "ferroquant imatrix", "hf")
    kw: dict[str, Any] = {}
    if gguf_file is not None:
        from .. import gguf as fg

        kw = {"gguf_file": gguf_file}
        with fg.open(folder / gguf_file) as f:
            arch = str(f.metadata.get("general.architecture"))
            add_bos = bool(f.metadata.get("tokenizer.ggml.add_bos_token", False))
            bos = f.metadata.get("tokenizer.ggml.bos_token_id")
    else:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        arch = ARCHES.get((cfg.get("architectures") or ["?"])[0], "")
        if not arch:
            raise ValueError(f"{folder}: architecture {cfg.get('architectures')} not supported")
        bos = None
        add_bos = False
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    if gguf_file is None:
        add_bos = bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None
        bos = tok.bos_token_id
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    return m.eval(), tok, arch, (int(bos) if add_bos and bos is not None else None)


def run(args: argparse.Namespace) -> int:
    from ..calib.data import read_calibration_text
    from ..methods.imatrix import chunk_ids, compute_imatrix, gguf_linear_names
    from ..methods.imatrix_io import write_imatrix

    text, what = read_calibration_text(args.text)
    model, tok, arch, bos = load_float_model(args.model)
    ids = chunk_ids(tok, text, args.ctx, args.chunks, bos)

    def progress(k: int, n: int) -> None:
        if not args.quiet:
            print(f"\rimatrix: chunk {k}/{n}", end="" if k < n else "\n", file=sys.stderr)

    names = gguf_linear_names(model, arch)
    from ..defaults import CALIBRATION_TEXT, gensim_text_path

    dataset = str(args.text if args.text is not None else gensim_text_path(CALIBRATION_TEXT))
    if args.ray is not None:
        require("ray", "ferroquant imatrix --ray", "distributed")
        from ..distributed import compute_imatrix as compute_on_cluster

        im = compute_on_cluster(model, ids, names, process_output=args.process_output,
                                dataset=dataset, progress=progress, address=args.ray)  # fmt: skip
    else:
        im = compute_imatrix(model, ids, names, process_output=args.process_output,
                             dataset=dataset, progress=progress)  # fmt: skip
    write_imatrix(im, args.output)
    print(
        f"wrote {args.output}: {len(im.entries)} tensors, {im.chunk_count} chunks of "
        f"{im.chunk_size} tokens ({what})"
    )
    return 0
