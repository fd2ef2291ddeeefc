"""GGUF reading and writing: ferroquant.gguf against gguf-py on the same file, same run.

    python benches/bench_gguf.py [--mib 256] [--vocab 128000] [--runs 5]

Builds a llama-like file (a 128k-token vocabulary with scores and token types, q8_0 / q4_0 / f16
tensors) in a temporary folder, then times (median (min-max) of --runs runs, each run doing every
operation with both libraries in turn, benchlib.interleave):
  open   open the file and list every metadata value and tensor (name, shape, type)
  read   open and read every tensor's bytes (a reduction over each data view touches all pages)
  write  write the same file (ours: streaming writer; gguf-py: GGUFWriter)
and prints a table with the ratio gguf-py time / ours (> 1 means ours is faster).
The file is written once before timing, so reads hit the page cache: this measures the parsing
and the data path, not the disk.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import tempfile
import time

import benchlib
import gguf
import numpy as np

import ferroquant as fq
import ferroquant.gguf as fg


def make_model(mib: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = [f"tok{i}" for i in range(vocab)]
    metadata = {
        "general.architecture": "llama",
        "general.name": "bench",
        "llama.context_length": np.uint32(4096),
        "llama.embedding_length": np.uint32(4096),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": rng.standard_normal(vocab).astype(np.float32),
        "tokenizer.ggml.token_type": np.ones(vocab, np.int32),
    }
    tensors = {}
    base = rng.standard_normal((1024, 4096)).astype(np.float32)
    cycle = [("q8_0", 1024), ("q4_0", 1024), ("f16", 256)]
    total, i = 0, 0
    while total < mib * 2**20:
        qtype, rows = cycle[i % len(cycle)]
        x = base[:rows]
        t = x.astype(np.float16) if qtype == "f16" else fq.quantize(x, qtype)
        tensors[f"blk.{i}.{qtype}.weight"] = t
        total += t.nbytes if qtype == "f16" else t.data.nbytes
        i += 1
    return metadata, tensors, total


def write_ours(path, metadata, tensors):
    fg.write_gguf(path, metadata, tensors)


def write_gguf_py(path, metadata, tensors):
    w = gguf.GGUFWriter(path, "llama")
    for k, v in metadata.items():
        if k == "general.architecture":
            continue
        if isinstance(v, np.ndarray):
            w.add_key_value(k, v.tolist(), gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType.FLOAT32 if v.dtype == np.float32
                            else gguf.GGUFValueType.INT32)  # fmt: skip
        elif isinstance(v, np.uint32):
            w.add_uint32(k, int(v))
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_string(k, v)
    for name, t in tensors.items():
        if isinstance(t, fq.QTensor):
            qt = gguf.GGMLQuantizationType[t.qtype.upper()]
            w.add_tensor(name, t.data.reshape(t.shape[0], -1), raw_dtype=qt)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def open_ours(path):
    with fg.open(path) as f:
        n = len(f.metadata) + sum(len(t.shape) for t in f.tensors.values())
    return n


def open_gguf_py(path):
    r = gguf.GGUFReader(path)
    n = len([f.contents() for f in r.fields.values()])
    return n + sum(len(t.shape) for t in r.tensors)


def read_ours(path):
    with fg.open(path) as f:
        return sum(int(np.bitwise_xor.reduce(t.data)) for t in f.tensors.values())


def read_gguf_py(path):
    r = gguf.GGUFReader(path)
    [f.contents() for f in r.fields.values()]
    return sum(int(np.bitwise_xor.reduce(np.asarray(t.data).reshape(-1).view(np.uint8)))
               for t in r.tensors)  # fmt: skip


def timed(fn, path):
    def run() -> float:
        t0 = time.perf_counter()
        fn(path)
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="tensor bytes in the file")
    ap.add_argument("--vocab", type=int, default=128000)
    benchlib.add_runs(ap, 5)
    args = ap.parse_args()
    load_start = benchlib.load()
    metadata, tensors, total = make_model(args.mib, args.vocab)
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = os.path.join(d, "ours.gguf"), os.path.join(d, "py.gguf")
        write_ours(ours, metadata, tensors)
        write_gguf_py(theirs, metadata, tensors)
        assert open(ours, "rb").read() == open(theirs, "rb").read(), "the two files differ"
        assert read_ours(ours) == read_gguf_py(ours)
        ops = (
            ("open + list", open_ours, open_gguf_py, ours),
            ("read all tensors", read_ours, read_gguf_py, ours),
            ("write file", lambda p: write_ours(p, metadata, tensors),
             lambda p: write_gguf_py(p, metadata, tensors), os.path.join(d, "w.gguf")),
        )  # fmt: skip
        engines = {}
        for what, mine, peer, path in ops:
            engines[what, "ours"] = timed(mine, path)
            engines[what, "peer"] = timed(peer, path)
        res = benchlib.interleave(engines, args.runs)
        size = os.path.getsize(ours)
    rows = []
    for what, *_ in ops:
        t_ours, t_peer = res[what, "ours"], res[what, "peer"]
        bw = benchlib.spread([size / t / 1e9 for t in t_ours], ".2f")
        rows.append((what, benchlib.spread([t * 1e3 for t in t_ours], ".2f"),
                     benchlib.spread([t * 1e3 for t in t_peer], ".2f"),
                     benchlib.ratio(t_ours, t_peer, False),
                     bw if what != "open + list" else "-"))  # fmt: skip
    print(f"\nbench_gguf: {benchlib.machine()} (at the start: {load_start})")
    print(f"ferroquant {fq.__version__}, gguf-py {importlib.metadata.version('gguf')}")
    print(
        f"file: {size / 2**20:.1f} MiB ({total / 2**20:.1f} MiB of tensors in {len(tensors)} "
        f"tensors, vocabulary {args.vocab}); median (min-max) of {args.runs} runs, interleaved; "
        "page cache warm; ratio: gguf-py time / ours"
    )
    head = ("operation", "ferroquant ms", "gguf-py ms", "ratio", "ours GB/s")
    print(benchlib.table(head, rows))


if __name__ == "__main__":
    main()
