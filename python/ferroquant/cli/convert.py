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
    c.add_argument(
        "--method",
        default="rtn",
        help="rtn (round to nearest, no data), or calibrated, layer by layer: gptq, awq, "
        "awq+gptq (AWQ's scaling and clipping, then GPTQ)",
    )
    c.add_argument(
        "--calib",
        default=None,
        help="calibration text file for the calibrated methods (default: gensim's "
        "lee_background.cor)",
    )
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|ADDRESS",
        help="convert on a Ray cluster (auto: the running one; or HOST:PORT); same bytes",
    )
    c.add_argument(
        "--ray-transfer",
        default="shared-fs",
        choices=["shared-fs", "object-store"],
        help="with --ray: workers memory-map the shards from a filesystem every node sees "
        "(shared-fs), or the driver reads them and ships them through Ray's object store",
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
        help="with --ray: continue from the tensors kept in OUT.resume by an interrupted run",
    )
    c.add_argument(
        "--no-side-file",
        action="store_true",
        help="with --ray: keep no OUT.resume (every byte written once; no --resume possible)",
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
    from ..methods import method_config

    cfg = method_config(args.method)  # an unknown method fails before anything is read
    if args.calib is not None and not Path(args.calib).is_file():
        raise FileNotFoundError(f"no such calibration text: {args.calib}")
    method = args.method.lower()
    calibrated = method != "rtn"
    if calibrated and on_ray:
        raise ValueError(
            f"--method {method} runs on this machine; drop --ray (not distributed yet)"
        )
    from ..models.convert import gguf_to_hf, hf_to_gguf

    if src.suffix.lower() == ".gguf":  # the reverse direction, for inspection
        written = gguf_to_hf(src, args.out, dtype=args.dtype)
        print(f"wrote {', '.join(written)} to {args.out}")
        return 0
    if not src.is_dir():
        raise ValueError(f"{src}: expected a Hugging Face checkpoint folder or a .gguf file")
    if not on_ray:
        if args.resume:
            raise ValueError("--resume continues an interrupted --ray conversion; add --ray")
        tensors = None
        if calibrated:
            if args.qtype.lower() in ("f32", "f16", "bf16"):
                raise ValueError(f"--method {method} needs a quantized --qtype, got {args.qtype}")
            tensors = _calibrated_tensors(src, args, method, cfg)
        hf_to_gguf(src, args.out, args.qtype, progress=not args.quiet, tensors=tensors)
    else:
        from ..distributed import convert

        convert(
            src,
            args.out,
            args.qtype,
            address=args.ray,
            transfer=args.ray_transfer,
            window_bytes=args.ray_window << 20,
            resume=args.resume,
            side_file=not args.no_side_file,
            progress=not args.quiet,
        )
    print(summary_line(args.out))
    return 0


def _calibrated_tensors(
    src: Path, args: argparse.Namespace, method: str, cfg: object
) -> dict[str, object]:
    """The calibrated method on the checkpoint in float32: {HF tensor name: QTensor} for
    hf_to_gguf to write, plus (AWQ) the norms and biases its scales were folded into."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..methods import method_config
    from ..models.quantize import quantize_model
    from ..models.recipes import recipe_for
    from ..nn import QuantLinear

    hp = json.loads((src / "config.json").read_text())
    n_head = int(hp.get("num_attention_heads", 1))
    n_gqa = n_head // int(hp.get("num_key_value_heads", n_head))
    recipe = recipe_for(args.qtype, ("lm_head",), n_gqa)
    gcfg = method_config(method, cfg, n_samples=args.calib_samples, seq_len=args.calib_len)
    tok = AutoTokenizer.from_pretrained(str(src))
    calib = Path(args.calib) if args.calib is not None else None
    from ..calib import calibration_ids

    ids = calibration_ids(calib, tok, gcfg.n_samples, gcfg.seq_len)  # too short: before loading
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dim() == 1}
    quantize_model(model, recipe, method=method, calibration=ids, config=gcfg,
                   progress=not args.quiet)  # fmt: skip
    out: dict[str, object] = {
        f"{name}.weight": mod.qtensor()
        for name, mod in model.named_modules()
        if isinstance(mod, QuantLinear)
    }
    for k, v in model.state_dict().items():  # AWQ's folds: rescaled norm weights / biases
        if k in before and not torch.equal(v, before[k]):
            out[k] = v.detach().to(torch.float32)
    return out
