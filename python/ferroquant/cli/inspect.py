"""`ferroquant inspect`: metadata and tensor table of a GGUF file (core install only)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="metadata and tensor table of a GGUF file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import gguf

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
