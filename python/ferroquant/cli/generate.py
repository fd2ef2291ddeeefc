"""`ferroquant generate`: text from a llama-family GGUF on the native runtime (no torch)."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text from a llama-family GGUF (native runtime)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("model", help="a .gguf file (llama architecture)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument("--ctx", type=int, default=2048, help="KV cache positions")
    g.add_argument(
        "--kv",
        default="f32",
        metavar="TYPE",
        help="KV cache type: f32 f16 q8_0 fp8_e4m3 q4_0 int4 int2 (docs/kv.md)",
    )
    g.add_argument("--kv-budget", default="512MiB", help="KV cache pool size")
    g.add_argument(
        "--kv-rotation",
        choices=["default", "on", "off", "values"],
        default="default",
        help="Walsh-Hadamard rotation per head of K and V (on), V only (values) or none "
        "(default: the type's, docs/kv.md)",
    )
    g.add_argument(
        "--kv-sinks",
        type=int,
        help="int4 / int2: first positions kept in f16 (default: the type's, int2 4, int4 0)",
    )
    g.add_argument(
        "--kv-residual",
        type=int,
        help="int4 / int2: recent positions kept in f16 before a page is quantized "
        "(default: the type's, int2 128, int4 0)",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--json", action="store_true", help="print JSON instead of the text")
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import generate_text

    rotation = {"on": True, "off": False, "values": "values"}.get(args.kv_rotation)
    r = generate_text(args.model, args.prompt, args.max_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, n_threads=args.threads, n_ctx=args.ctx,
                      chat=args.chat, kv_type=args.kv, kv_budget=args.kv_budget,
                      kv_rotation=rotation, kv_sinks=args.kv_sinks,
                      kv_residual=args.kv_residual)  # fmt: skip
    if args.json:
        print(json.dumps(r))
    else:
        print(r["text"])
        print(f"[{len(r['prompt_token_ids'])} prompt tokens at {r['prompt_tokens_per_second']:.1f} "
              f"tok/s, {len(r['token_ids'])} generated at {r['decode_tokens_per_second']:.1f} "
              f"tok/s, {r['threads']} threads, kv {r['kv_type']}; {r['load_report']}]",
              file=sys.stderr)  # fmt: skip
    return 0
