"""`ferroquant eval`: quality, size and speed of every precision on a real model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_ROWS = "bf16,fp8_e4m3,int8,q8_0,q6_k,q5_k_m,q4_k_m,q4_0,nf4,nf4+dq,q3_k,q2_k"


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default: appended as argparse does, unless the help already says it in
    words (the options whose default is None); flags read "(default: off)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if action.default is False:
            return text + " (default: off)"
        return super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="quality/size/speed table of every precision on a real model",
        formatter_class=_DefaultsHelp,
    )
    e.add_argument("model", nargs="?", help="HF checkpoint folder or .gguf (default: SmolLM2-135M)")
    e.add_argument(
        "--qtypes", help=f"comma-separated rows (default: {DEFAULT_ROWS}); bf16 is the baseline"
    )
    e.add_argument(
        "--methods",
        help="comma-separated methods (rtn gptq awq awq+gptq hqq): one row per method and row, "
        "QTYPE for rtn and QTYPE+METHOD for the others (default: rtn only)",
    )
    e.add_argument(
        "--calib",
        help="calibration text of the gptq / awq rows (default: gensim's lee_background.cor; "
        "never the held-out text)",
    )
    e.add_argument(
        "--calib-samples", type=int, default=16, help="calibration windows of the gptq / awq rows"
    )
    e.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    e.add_argument("--text", help="held-out text file (default: gensim's lee.cor)")
    e.add_argument("--ctx", type=int, default=512, help="context length")
    e.add_argument("--stride", type=int, help="window stride (default: ctx, no overlap)")
    e.add_argument("--max-tokens", type=int, default=2048, help="tokens scored (0: whole text)")
    e.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for speed")
    e.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed")
    e.add_argument("--speed-runs", type=int, default=3, help="speed rounds (median reported)")
    e.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    e.add_argument("--out", default="ferroquant-eval", help="output folder (JSON, Markdown, PNG)")
    e.add_argument(
        "--against",
        choices=["llama.cpp"],
        help="also score llama.cpp's quantizations (default: off)",
    )
    e.add_argument("--no-plot", action="store_true", help="skip the PNG")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._extras import require

    for module in ("torch", "transformers", "gguf", "gensim"):
        require(module, "ferroquant eval", "eval")
    from ..eval import report
    from ..eval.run import run_eval

    result = run_eval(
        args.model,
        rows=args.qtypes,
        text=args.text,
        ctx=args.ctx,
        stride=args.stride,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        threads=args.threads,
        speed_runs=args.speed_runs,
        progress=not args.no_progress,
        against=args.against,
        methods=args.methods,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
    )
    result["files"] = report.save(result, args.out, png=not args.no_plot)
    print(json.dumps(result) if args.json else report.format_table(result))
    written = ", ".join(Path(p).name for p in result["files"].values())
    print(f"wrote {written} to {Path(args.out).resolve()}", file=sys.stderr)
    return 0
