"""`ferroquant kv-size`: the exact KV-cache size of a model for a context length, per cache type
(core install only: reads the model's metadata, no weights)."""

from __future__ import annotations

import argparse
import json
import re

_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_tokens(text: str) -> int:
    """'2048', '128K', '2M' -> a token count. K and M are binary (1024, 1024^2), as context
    lengths are quoted: Llama-3's '128K' is 131072 tokens."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KkMmGg]?)\s*", str(text))
    if m is None:
        raise ValueError(f"--tokens: expected a count like 4096, 128K or 2M, got {text!r}")
    n = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if n != int(n):
        raise ValueError(f"--tokens: {text!r} is not a whole number of tokens")
    return int(n)


def parse_kv_types(values: list[str]) -> list[str]:
    from ..kv.types import KV_TYPES, kv_type

    names: list[str] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            names.extend(KV_TYPES) if part.lower() == "all" else names.append(kv_type(part).name)
    return list(dict.fromkeys(names)) or list(KV_TYPES)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def add_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser(
        "kv-size",
        help="exact KV-cache bytes per token and in total, per cache type",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    k.add_argument(
        "model", metavar="MODEL_OR_CONFIG", help="a .gguf file, an HF folder or a config.json"
    )
    k.add_argument("--tokens", default="4096", help="context length: 4096, 128K, 2M (K, M binary)")
    k.add_argument(
        "--kv", nargs="+", default=["all"], help="cache types (space or comma separated) or 'all'"
    )
    k.add_argument(
        "--residual-bytes",
        type=int,
        default=2,
        choices=(2, 4),
        help="bytes per value of the int4/int2 full-precision tokens (model dtype)",
    )
    k.add_argument(
        "--kv-sinks",
        type=int,
        default=None,
        help="int4/int2: first tokens kept in full precision (default: int2 4, int4 0)",
    )
    k.add_argument(
        "--kv-residual",
        type=int,
        default=None,
        help="int4/int2: newer tokens a group waits for in full precision (int2 128, int4 0)",
    )
    k.add_argument("--json", action="store_true", help="print JSON instead of a table")
    k.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..kv.sources import kv_shape_from_path
    from ..kv.types import KV_TYPES, kv_bytes_per_token, kv_cache_bytes, kv_full_precision_tokens

    tokens = parse_tokens(args.tokens)
    kinds = parse_kv_types(args.kv)
    shape = kv_shape_from_path(args.model)
    fp_token = shape.n_layer * 2 * shape.n_head_kv * shape.head_dim * args.residual_bytes
    rows = []
    for kind in kinds:
        # the window options belong to the KIVI types; the others ignore them
        kivi = KV_TYPES[kind].kivi
        win = {"sinks": args.kv_sinks, "residual": args.kv_residual} if kivi else {}
        full = kv_full_precision_tokens(shape, kind, tokens, **win)
        rows.append(
            {
                "kv_type": kind,
                "bytes_per_token": kv_bytes_per_token(shape, kind),
                "tokens": tokens,
                "full_precision_tokens": full,
                "full_precision_bytes": full * fp_token,
                "total_bytes": kv_cache_bytes(shape, kind, tokens, args.residual_bytes, **win),
            }
        )
    if args.json:
        print(json.dumps({"model": str(args.model), "shape": vars(shape), "rows": rows}))
        return 0
    print(
        f"{args.model}: {shape.n_layer} layers x 2 (K, V) x {shape.n_head_kv} KV heads x "
        f"head_dim {shape.head_dim}; {tokens:,} tokens (one sequence)"
    )
    print(
        f"{'kv_type':<10} {'bytes/token':>12} {'fp tokens':>10} {'fp bytes/seq':>14} "
        f"{'total bytes':>18} {'total':>12}"
    )
    for r in rows:
        print(
            f"{r['kv_type']:<10} {r['bytes_per_token']:>12,} {r['full_precision_tokens']:>10,} "
            f"{r['full_precision_bytes']:>14,} {r['total_bytes']:>18,} "
            f"{_human(r['total_bytes']):>12}"
        )
    print(
        "bytes/token: quantized steady state. int4 / int2 also hold 'fp tokens' per sequence "
        f"in the model's dtype ({fp_token:,} B each): the sinks and the tokens not yet in a "
        "quantized group (at most sinks + window + group - 1), a per-sequence constant."
    )
    return 0
