"""Our importance matrix vs llama.cpp's, same model, same tokens (SmolLM2-135M, lee_background).

llama.cpp's side is collected the way tools/imatrix collects it: the scheduler's eval callback
(`cb_eval`, the hook llama-imatrix installs) sees every MUL_MAT whose weight is `blk.*`, and sums
x_j^2 over the rows of its f32 activations (src1), counting rows. The llama-imatrix binary itself
is not built here (llama-cpp-python ships libllama, not the tools); the callback and the sums are
the same code path llama-imatrix runs inside the same library. Our side: `compute_imatrix` on the
transformers model of the same f32 weights. Both get the same token ids (chunks of 512, no BOS:
SmolLM2's vocabulary adds none).

Tolerance (derived): with f32 weights ggml keeps the activations in f32 (f32's vec_dot type is
f32); with `--kv f32` (the default here) the two sides differ only in summation order and
kernels (matmul blocking, softmax, RMSNorm): each op's relative error is about sqrt(K) * u
(u = 2^-24, K <= 1536 terms: ~2.3e-6), compounding through 30 layers x ~7 ops on the residual
path: ~5e-4 relative on an element of in_sum2 at most, less on sums over 512+ tokens (errors
average). We require max relative difference < 1e-3 per tensor (median reported too).
llama-imatrix's default f16 KV cache (`--kv f16`) rounds V to 2^-11 relative (4.9e-4): x_j^2 of
attn_output's inputs then moves by ~1e-3 and more where an attention output cancels (a column's
sum small against its terms); measured, not bounded.

    python benches/imatrix_vs_llamacpp.py [--chunks 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import benchlib  # noqa: E402

GGML_MAX_SRC = 10
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (ggml 0.25: GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int32),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int32),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def llama_imatrix(
    gguf: Path, chunks: list[list[int]], kv_f32: bool = True
) -> dict[str, tuple[np.ndarray, int]]:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_op_name.argtypes = [ctypes.c_int]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def collect(t_ptr, ask, user):  # llama-imatrix's collect_imatrix, dense tensors
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        if base.ggml_op_name(t.op) != b"MUL_MAT":
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = src0.name.decode()
        if "#" in name:
            name = name.split("#")[1]
        if ask:
            return bool(src1.ne[1] >= 16 and src1.type == GGML_TYPE_F32 and name.startswith("blk."))
        n_cols, n_rows = src1.ne[0], src1.ne[1] * src1.ne[2] * src1.ne[3]
        assert src1.nb[0] == 4 and src1.nb[1] == 4 * n_cols, "contiguous f32 rows expected"
        x = np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_float)),
                                  shape=(n_rows, n_cols)).astype(np.float64)  # fmt: skip
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + n_rows
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(collect)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=2, verbose=False)  # fmt: skip
    try:
        # a context whose scheduler calls `cb` (llama_cpp.Llama takes no cb_eval of its own)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = 2
        if kv_f32:  # llama.cpp's defaults: f16 KV cache, flash attention where supported (the
            # CPU kernel rounds Q and the softmax weights to f16): see the tolerance
            params.type_k = params.type_v = GGML_TYPE_F32
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.cb_eval = cb
        params.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        try:
            for ids in chunks:
                mem = llama_cpp.llama_get_memory(ctx)
                llama_cpp.llama_memory_clear(mem, True)
                # logits for every token, as llama-imatrix asks when it computes perplexity
                # (otherwise the last layer's FFN sees only the last row and is skipped)
                batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
                try:
                    for i, t in enumerate(ids):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                        batch.seq_id[i][0], batch.logits[i] = 0, True
                    batch.n_tokens = len(ids)
                    rc = llama_cpp.llama_decode(ctx, batch)
                finally:
                    llama_cpp.llama_batch_free(batch)
                assert rc == 0, f"llama_decode: {rc}"
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llm.close()
    return {k: (v, counts[k]) for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument(
        "--kv",
        choices=["f32", "f16"],
        default="f32",
        help="llama.cpp's attention: f32 (f32 KV cache, no flash attention) or its defaults (f16)",
    )
    ap.add_argument("--keep", default=None, help="folder with hf/ and f32.gguf (made if absent)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ferroquant.calib.data import read_calibration_text
    from ferroquant.defaults import default_model_path
    from ferroquant.methods.imatrix import chunk_ids, compute_imatrix, gguf_linear_names
    from ferroquant.models.convert import gguf_to_hf, hf_to_gguf

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="imatrix-vs-llama-"))
    hf, src = tmp / "hf", tmp / "f32.gguf"
    if not (hf / "model.safetensors").exists():
        gguf_to_hf(default_model_path(), hf)
    if not src.exists():
        hf_to_gguf(hf, src, "f32")
    tok = AutoTokenizer.from_pretrained(str(hf))
    text, _ = read_calibration_text(None)
    ids = chunk_ids(tok, text, 512, args.chunks, None)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ours = compute_imatrix(model, ids, gguf_linear_names(model, "llama"))
    theirs = llama_imatrix(src, ids.tolist(), args.kv == "f32")
    assert set(theirs) == set(ours.entries), sorted(set(theirs) ^ set(ours.entries))[:5]
    worst = []
    for name, (s, n) in theirs.items():
        e = ours.entries[name]
        assert e.counts[0] == n, (name, e.counts, n)
        rel = np.abs(e.in_sum2[0].astype(np.float64) - s) / np.maximum(np.abs(s), 1e-30)
        worst.append((float(rel.max()), float(np.median(rel)), name))
    worst.sort(reverse=True)
    print(f"# imatrix_vs_llamacpp  machine: {benchlib.machine()}; load {benchlib.load()}")
    print(
        f"{len(theirs)} tensors, same names and token counts ({args.chunks} x 512 tokens), "
        f"llama.cpp KV cache {args.kv}"
    )
    print(benchlib.table(["tensor", "max rel diff", "median rel diff"],
                         [[n, f"{a:.2e}", f"{b:.2e}"] for a, b, n in worst[:5]]))  # fmt: skip
    print(f"all tensors: max rel diff {worst[0][0]:.2e} (bound 1e-3): "
          f"{'PASS' if worst[0][0] < 1e-3 else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()
