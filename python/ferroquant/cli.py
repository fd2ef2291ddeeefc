"""The `ferroquant` command (also `python -m ferroquant`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from . import __version__, _native


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.safetensors:
        if not args.tensor:
            raise SystemExit("ferroquant demo: --safetensors needs --tensor NAME")
        x = demo.load_tensor(args.safetensors, args.tensor)
        source = f"{args.safetensors}:{args.tensor}"
    else:
        x, source = demo.default_weights()
    rows = demo.run(x)
    if args.json:
        print(json.dumps({"source": source, "shape": list(x.shape), "rows": demo.as_json(rows)}))
    else:
        print(demo.format_table(rows, source, x.shape))
    return 0


def _peer_version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # a peer that fails to import is reported, not fatal
        return f"not available ({type(e).__name__})"
    return getattr(mod, "__version__", "installed")


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .qtypes import qtype_info

    qtypes = tuple(qtype_info(q).name for q in args.qtypes.split(",")) if args.qtypes else None
    rows = bench.run(args.rows, args.cols, qtypes or bench.DEFAULT_QTYPES)
    if args.json:
        print(json.dumps({"shape": [args.rows, args.cols], "rows": rows}))
    else:
        print(bench.format_table(rows, (args.rows, args.cols)))
    return 0


def _cuda_status() -> str:
    try:
        from . import cuda
    except Exception as e:  # the shim itself failing to import is worth reporting, not fatal
        return f"shim failed to import ({type(e).__name__}: {e})"
    return cuda.diagnose()


def _cmd_doctor(args: argparse.Namespace) -> int:
    info = {
        "ferroquant": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": _native.num_threads(),
        "simd": _native.simd_level(),
        "FERROQUANT_FORCE_SCALAR": os.environ.get("FERROQUANT_FORCE_SCALAR", "(unset)"),
        "FERROQUANT_NUM_THREADS": os.environ.get("FERROQUANT_NUM_THREADS", "(unset: all cores)"),
        "peers": {m: _peer_version(m) for m in ("numpy", "torch", "gguf", "bitsandbytes")},
        "cuda": _cuda_status(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                print(f"{k}:")
                for kk, vv in v.items():
                    print(f"  {kk:<14} {vv}")
            else:
                print(f"{k:<24} {v}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.convert import gguf_to_hf, hf_to_gguf

    if str(args.src).endswith(".gguf"):  # the reverse direction, for inspection
        written = gguf_to_hf(args.src, args.out, dtype=args.dtype)
        print(f"wrote {', '.join(written)} to {args.out}")
        return 0
    hf_to_gguf(args.src, args.out, args.qtype, progress=not args.quiet)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .models.convert import quantize_gguf

    quantize_gguf(args.input, args.out, args.qtype, progress=not args.quiet)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .runtime import generate_text

    r = generate_text(args.model, args.prompt, args.max_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, n_threads=args.threads, n_ctx=args.ctx,
                      chat=args.chat)  # fmt: skip
    if args.json:
        print(json.dumps(r))
    else:
        print(r["text"])
        print(f"[{len(r['prompt_token_ids'])} prompt tokens at {r['prompt_tokens_per_second']:.1f} "
              f"tok/s, {len(r['token_ids'])} generated at {r['decode_tokens_per_second']:.1f} "
              f"tok/s, {r['threads']} threads; {r['load_report']}]", file=sys.stderr)  # fmt: skip
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import gguf

    if not args.json:
        print(gguf.inspect(args.file))
        return 0
    with gguf.open(args.file) as f:
        meta = {
            k: {"type": f.metadata_types[k], "value": v.tolist() if hasattr(v, "tolist") else v}
            for k, v in f.metadata.items()
        }
        tensors = [
            {
                "name": t.name,
                "shape": list(t.shape),
                "qtype": t.qtype,
                "nbytes": t.nbytes,
                "offset": t.data_offset,
            }
            for t in f.tensors.values()
        ]
        info = {
            "path": f.path,
            "version": f.version,
            "alignment": f.alignment,
            "file_size": f.file_size,
            "metadata": meta,
            "tensors": tensors,
        }
    print(json.dumps(info))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import eval as ev
    from . import eval_report

    result = ev.run_eval(
        args.model,
        rows=args.qtypes,
        text=args.text,
        ctx=args.ctx,
        stride=args.stride,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        threads=args.threads,
        progress=not args.no_progress,
        against=args.against,
    )
    result["files"] = eval_report.save(result, args.out, png=not args.no_plot)
    print(json.dumps(result) if args.json else eval_report.format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferroquant", description=__doc__)
    p.add_argument("--version", action="version", version=f"ferroquant {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="quantize a real weight matrix into every format")
    d.add_argument("--safetensors", help="a .safetensors file (default: all-MiniLM-L6-v2)")
    d.add_argument("--tensor", help="name of a 2-D tensor in that file")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="quick throughput of quantization and the CPU matmul")
    b.add_argument("--rows", type=int, default=1024)
    b.add_argument("--cols", type=int, default=4096)
    b.add_argument("--qtypes", help="comma-separated qtypes (default: a representative set)")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.set_defaults(func=_cmd_bench)

    doc = sub.add_parser("doctor", help="what this machine and installation support")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=_cmd_doctor)

    qhelp = "f32, f16, bf16, a llama.cpp file type (q4_k_m, q8_0, ...) or a ggml qtype"
    c = sub.add_parser(
        "convert", help="a Hugging Face llama-family folder -> GGUF (or a .gguf -> HF folder)"
    )
    c.add_argument("src", help="a Hugging Face folder, or a .gguf file for the reverse direction")
    c.add_argument("out", help="the GGUF file to write (or the folder, from a .gguf)")
    c.add_argument("--qtype", default="f16", help=qhelp)
    c.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype of the HF folder written from a .gguf",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    q = sub.add_parser("quantize", help="requantize a GGUF file")
    q.add_argument("input")
    q.add_argument("out")
    q.add_argument("--qtype", required=True, help=qhelp)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_quantize)

    i = sub.add_parser("inspect", help="metadata and tensor table of a GGUF file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_cmd_inspect)
    g = sub.add_parser("generate", help="generate text from a llama-family GGUF (native runtime)")
    g.add_argument("model", help="a .gguf file (llama architecture)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument("--ctx", type=int, default=2048, help="KV cache positions (default 2048)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--json", action="store_true", help="print JSON instead of the text")
    g.set_defaults(func=_cmd_generate)
    e = sub.add_parser("eval", help="quality/size/speed table of every precision on a real model")
    e.add_argument("model", nargs="?", help="HF checkpoint folder or .gguf (default: SmolLM2-135M)")
    e.add_argument(
        "--qtypes",
        help="comma-separated rows (default: bf16,fp8_e4m3,int8,q8_0,"
        "q6_k,q5_k_m,q4_k_m,q4_0,nf4,nf4+dq,q3_k,q2_k); bf16 is always the baseline",
    )
    e.add_argument("--text", help="held-out text file (default: gensim's lee.cor)")
    e.add_argument("--ctx", type=int, default=512, help="context length (default 512)")
    e.add_argument("--stride", type=int, help="window stride (default: ctx, no overlap)")
    e.add_argument("--max-tokens", type=int, default=2048, help="tokens scored (0: whole text)")
    e.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for speed")
    e.add_argument("--decode-tokens", type=int, default=16, help="greedy decode steps timed")
    e.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    e.add_argument("--out", default="ferroquant-eval", help="output folder (JSON, Markdown, PNG)")
    e.add_argument("--against", choices=["llama.cpp"], help="also score llama.cpp's quantizations")
    e.add_argument("--no-plot", action="store_true", help="skip the PNG")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError, KeyError) as e:
        print(f"ferroquant {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
