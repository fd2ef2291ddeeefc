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
    c.add_argument(
        "out", help="the GGUF file to write (or the folder, from a .gguf or with --format)"
    )
    c.add_argument(
        "--format",
        default="gguf",
        choices=["gguf", "gptq", "awq"],
        help="gptq / awq: a checkpoint folder transformers, GPTQModel and AutoAWQ load "
        "(grouped integers, --bits / --group-size; every other tensor float16)",
    )
    c.add_argument("--bits", type=int, default=4, help="with --format gptq|awq: 2, 3, 4 or 8")
    c.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="with --format gptq|awq: 32, 64, 128, or -1 (one group per row); it must divide "
        "the rows (SmolLM2's 576: 32 or 64)",
    )
    c.add_argument(
        "--sym",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="with --format gptq: symmetric (default, as GPTQModel) or integer zero points "
        "(--no-sym); AWQ always has zero points",
    )
    c.add_argument("--qtype", default="f16", help=QTYPE_HELP)
    c.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype of the HF folder written from a .gguf",
    )
    c.add_argument(
        "--method",
        default="rtn",
        help="rtn (round to nearest, no data); calibrated, layer by layer: gptq, awq, awq+gptq "
        "(AWQ's scaling and clipping, then GPTQ); hqq (half-quadratic zero points, no data; "
        "--format awq or gptq with asymmetric groups)",
    )
    c.add_argument(
        "--calib",
        default=None,
        help="calibration text file for the calibrated methods (default: gensim's "
        "lee_background.cor)",
    )
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    c.add_argument(
        "--imatrix",
        default=None,
        metavar="FILE",
        help="importance matrix (llama.cpp's GGUF or legacy .dat, e.g. from `ferroquant "
        "imatrix`) for every quantizer that takes one",
    )
    c.add_argument(
        "--target-size",
        default=None,
        metavar="SIZE",
        help="measured per-tensor allocation: the whole file at most SIZE (110MB, 0.1GiB, bytes)",
    )
    c.add_argument(
        "--target-bpw",
        type=float,
        default=None,
        metavar="B",
        help="measured per-tensor allocation: B bits per weight over the quantized tensors",
    )
    c.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="with --target-*: reuse this allocation plan when it exists (no measurement), else "
        "save the plan there",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|ADDRESS",
        help="convert on a Ray cluster (auto: the running one; or HOST:PORT), the calibrated "
        "--method included; same bytes",
    )
    c.add_argument(
        "--ray-transfer",
        default="shared-fs",
        choices=["shared-fs", "object-store"],
        help="with --ray: workers memory-map the shards from a filesystem every node sees "
        "(shared-fs), or the driver reads them and ships them through Ray's object store",
    )
    c.add_argument(
        "--ray-write",
        default="driver",
        choices=["driver", "workers"],
        help="with --ray: the results come back to the driver, which writes them (driver), or "
        "each task writes its bytes into the output file itself, which must be on a filesystem "
        "every node sees (workers: nothing but checksums travels back)",
    )
    c.add_argument(
        "--ray-window",
        type=int,
        default=1024,
        metavar="MIB",
        help="with --ray: MiB of tensors in flight at the driver (results, and inputs with "
        "object-store)",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="with --ray: continue from the tensors an interrupted run listed in OUT.resume "
        "(--method gptq/awq/awq+gptq: from the layers kept in OUT.layers.resume/)",
    )
    c.add_argument(
        "--no-side-file",
        action="store_true",
        help="with --ray: keep no OUT.resume / OUT.layers.resume (no --resume possible)",
    )
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    on_ray = args.ray is not None
    purpose, extra = (
        ("ferroquant convert --ray", "distributed") if on_ray else ("ferroquant convert", "hf")
    )
    for module in ("torch", "gguf", "transformers", *(["ray"] if on_ray else [])):
        require(module, purpose, extra)
    if args.quiet:  # transformers' own bars too (its "Loading weights" when it reads the model)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from ..methods import method_config

    cfg = method_config(args.method)  # an unknown method fails before anything is read
    if args.calib is not None and not Path(args.calib).is_file():
        raise FileNotFoundError(f"no such calibration text: {args.calib}")
    method = args.method.lower()
    calibrated = method in ("gptq", "awq", "awq+gptq")
    gptq = method == "gptq"
    if method == "hqq" and args.format == "gguf":
        raise ValueError("--method hqq writes grouped integer checkpoints (--format awq|gptq)")
    allocate = args.target_size is not None or args.target_bpw is not None or args.plan
    if on_ray and allocate:
        raise ValueError("--target-* / --plan run on this machine; drop --ray")
    if args.target_size is not None and args.target_bpw is not None:
        raise ValueError("give --target-size or --target-bpw, not both")
    if allocate and calibrated and not gptq:
        raise ValueError(f"--target-* / --plan take --method rtn or gptq, got {method}")
    if calibrated and args.imatrix:
        raise ValueError(
            f"--method {method} measures the inputs from the calibration text; drop --imatrix"
        )
    imatrix = None
    if args.imatrix is not None:
        from ..methods.imatrix_io import read_imatrix

        imatrix = read_imatrix(args.imatrix)
    from ..models.convert import gguf_to_hf, hf_to_gguf

    if args.format != "gguf":
        return _to_checkpoint(src, args, cfg)
    if src.suffix.lower() == ".gguf":  # the reverse direction, for inspection
        written = gguf_to_hf(src, args.out, dtype=args.dtype)
        print(f"wrote {', '.join(written)} to {args.out}")
        return 0
    if not src.is_dir():
        raise ValueError(f"{src}: expected a Hugging Face checkpoint folder or a .gguf file")
    if allocate:
        from ..models.allocation import allocate_hf_to_gguf, parse_size

        target = parse_size(args.target_size) if args.target_size is not None else None
        calib = Path(args.calib) if args.calib is not None else None
        reused = args.plan is not None and Path(args.plan).is_file()
        tensors_for = (
            (lambda recipe: _calibrated_tensors(src, args, method, cfg, recipe)) if gptq else None
        )
        plan = allocate_hf_to_gguf(
            src, args.out, target_bytes=target, target_bpw=args.target_bpw, imatrix=imatrix,
            imatrix_name=args.imatrix or "", calibration=calib,
            n_samples=min(args.calib_samples, 16), seq_len=args.calib_len, plan_path=args.plan,
            tensors_for=tensors_for, progress=not args.quiet,
        )  # fmt: skip
        print(
            f"allocation: {len(plan.chosen)} tensors, {plan.total_bytes} tensor bytes, "
            f"estimated loss increase {plan.total_score:.4g} nats/token"
            + (f"; plan {'reused from' if reused else 'saved to'} {args.plan}" if args.plan else "")
        )
    elif not on_ray:
        if args.resume:
            raise ValueError("--resume continues an interrupted --ray conversion; add --ray")
        tensors = None
        if calibrated:
            if args.qtype.lower() in ("f32", "f16", "bf16"):
                raise ValueError(f"--method {method} needs a quantized --qtype, got {args.qtype}")
            tensors = _calibrated_tensors(src, args, method, cfg)
        hf_to_gguf(src, args.out, args.qtype, progress=not args.quiet, tensors=tensors,
                   imatrix=imatrix)  # fmt: skip
    elif calibrated:  # gptq / awq / awq+gptq on the cluster
        from ..distributed import convert

        if args.qtype.lower() in ("f32", "f16", "bf16"):
            raise ValueError(f"--method {method} needs a quantized --qtype, got {args.qtype}")
        convert(src, args.out, args.qtype, method=method, calibration=args.calib,
                n_samples=args.calib_samples, seq_len=args.calib_len, address=args.ray,
                resume=args.resume, side_file=not args.no_side_file,
                progress=not args.quiet)  # fmt: skip
    else:
        from ..distributed import convert

        convert(
            src,
            args.out,
            args.qtype,
            address=args.ray,
            transfer=args.ray_transfer,
            write=args.ray_write,
            window_bytes=args.ray_window << 20,
            resume=args.resume,
            side_file=not args.no_side_file,
            imatrix=imatrix,
            progress=not args.quiet,
        )
    print(summary_line(args.out))
    return 0


def _to_checkpoint(src: Path, args: argparse.Namespace, cfg: object) -> int:
    """`--format gptq|awq`: quantize (rtn, a calibrated method or hqq) and write the checkpoint
    folder (AWQ's scales folded into the norms are float tensors of the folder like any other)."""
    from ..calib import calibration_ids
    from ..methods import method_config
    from ..models.ecosystem import convert_to_checkpoint

    if args.ray is not None:
        raise ValueError(f"--format {args.format} runs on this machine; drop --ray")
    if not src.is_dir():
        raise ValueError(f"{src}: --format {args.format} needs a Hugging Face checkpoint folder")
    method = args.method.lower()
    if method not in ("rtn", "gptq", "awq", "awq+gptq", "hqq"):
        raise ValueError(
            f"--format {args.format} takes --method rtn, gptq, awq, awq+gptq or hqq, "
            f"got {args.method}"
        )
    calib = gcfg = None
    if method in ("gptq", "awq", "awq+gptq"):
        from transformers import AutoTokenizer

        gcfg = method_config(method, cfg, n_samples=args.calib_samples, seq_len=args.calib_len)
        tok = AutoTokenizer.from_pretrained(str(src))
        path = Path(args.calib) if args.calib is not None else None
        calib = calibration_ids(path, tok, gcfg.n_samples, gcfg.seq_len)
    out = convert_to_checkpoint(
        src, args.out, args.format, bits=args.bits, group_size=args.group_size, sym=args.sym,
        method=args.method, calibration=calib, config=gcfg, progress=not args.quiet,
    )  # fmt: skip
    print(f"wrote a {args.format} checkpoint ({args.bits}-bit, group {args.group_size}) to {out}")
    return 0


def _calibrated_tensors(
    src: Path, args: argparse.Namespace, method: str, cfg: object, recipe: object = None
) -> dict[str, object]:
    """The calibrated method on the checkpoint in float32: {HF tensor name: QTensor} for
    hf_to_gguf to write, plus (AWQ) the norms and biases its scales were folded into
    (`recipe`: the types to give, default the --qtype recipe)."""
    from ..methods import method_config
    from ..models.calibrated import calibrated_tensors

    gcfg = method_config(method, cfg, n_samples=args.calib_samples, seq_len=args.calib_len)
    calib = Path(args.calib) if args.calib is not None else None
    return calibrated_tensors(src, args.qtype, method, gcfg, calib, recipe=recipe,
                              progress=not args.quiet)  # fmt: skip
