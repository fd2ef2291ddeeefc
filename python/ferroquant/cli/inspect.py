"""`ferroquant inspect`: metadata and tensor table of a GGUF file (core install only)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="metadata and tensor table of a GGUF file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=run)


def allocation_lines(path: str) -> list[str]:
    """The allocation plan a `convert --target-*` file carries: tensor, type, bits per weight and
    the measured score of each chosen tensor (empty for other files)."""
    from .. import gguf

    with gguf.open(path) as f:
        names = f.metadata.get("ferroquant.allocation.tensors")
        scores = f.metadata.get("ferroquant.allocation.scores")
        if names is None or scores is None or len(names) != len(scores):
            return []
        lines = [
            f"allocation plan ({f.metadata.get('ferroquant.allocation.metric', '?')}):",
            f"  {'tensor':<28} {'type':<8} {'bits':>6} {'score':>12}",
        ]
        total = 0.0
        for name, score in zip(names, scores, strict=True):
            t = f.tensors.get(str(name))
            if t is None:
                continue
            total += float(score)
            lines.append(f"  {t.name:<28} {t.qtype:<8} {t.bits_per_weight:>6.3f} {score:>12.4e}")
        lines.append(f"  total estimated loss increase {total:.4e} nats/token")
    return lines


def run(args: argparse.Namespace) -> int:
    from .. import gguf

    if not args.json:
        print(gguf.inspect(args.file))
        plan = allocation_lines(args.file)
        if plan:
            print("\n".join(plan))
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
