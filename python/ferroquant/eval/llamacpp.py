"""`ferroquant eval --against llama.cpp`: llama.cpp's own quantizations of the same GGUF, scored
through llama-cpp-python with the same protocol (same token ids, windows, metrics, prompt and
decode lengths, threads), so the two stacks' numbers sit side by side.

llama.cpp's rows are made by `llama_model_quantize` from the source GGUF (requantizing: llama.cpp
dequantizes each tensor to float32, then quantizes; token embeddings and the output head follow
llama.cpp's own rules for the file type). Each row's KL and top-1 are against llama.cpp's baseline:
the source GGUF as it is, computed by llama.cpp in float32.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._extras import require
from .metrics import Scores, Window

# ferroquant row name -> (llama_ftype, the llama.cpp name of that file type)
LLAMA_FTYPES = {
    "bf16": (32, "BF16"),
    "f16": (1, "F16"),
    "q8_0": (7, "Q8_0"),
    "q6_k": (18, "Q6_K"),
    "q5_k_m": (17, "Q5_K_M"),
    "q5_k_s": (16, "Q5_K_S"),
    "q4_k_m": (15, "Q4_K_M"),
    "q4_k_s": (14, "Q4_K_S"),
    "q5_1": (9, "Q5_1"),
    "q5_0": (8, "Q5_0"),
    "q4_1": (3, "Q4_1"),
    "q4_0": (2, "Q4_0"),
    "iq4_nl": (25, "IQ4_NL"),
    "iq4_xs": (30, "IQ4_XS"),
    "q3_k": (11, "Q3_K_S"),
    "q3_k_m": (12, "Q3_K_M"),
    "q2_k": (10, "Q2_K"),
}


def _quantize(llama_cpp: Any, src: Path, dst: Path, ftype: int, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise OSError(f"llama.cpp could not quantize {src} to file type {ftype} (code {rc})")


def _score(llm: Any, ids: list[int], windows: list[Window], base: list[Any] | None) -> tuple:
    import numpy as np
    import torch

    logits_out = []
    scores = Scores()
    for k, w in enumerate(windows):
        llm.reset()
        llm.eval(ids[w.start : w.end])
        lg = torch.from_numpy(
            np.array(llm.scores[w.first - w.start - 1 : w.end - w.start - 1], dtype=np.float32)
        )
        logits_out.append(lg)
        ref = lg if base is None else base[k]
        scores.add(lg, ref, torch.tensor(ids[w.first : w.end]))
    return logits_out, scores


def _speeds(llm: Any, prompt: list[int], n_decode: int) -> tuple[float, float]:
    import numpy as np

    best = float("inf")
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best = min(best, time.perf_counter() - t0)
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return len(prompt) / best, n_decode / (time.perf_counter() - t0)


def run_llamacpp(
    gguf: Path,
    row_names: list[str],
    ids: list[int],
    windows: list[Window],
    prompt: list[int],
    decode_tokens: int,
    threads: int,
    progress: bool = True,
) -> dict[str, Any]:
    """llama.cpp's rows: the source GGUF (baseline) and its quantizations to each row's type."""
    llama_cpp = require("llama_cpp", "ferroquant eval --against llama.cpp", "test")
    from tqdm.auto import tqdm

    ctx = max(w.end - w.start for w in windows)
    n_ctx = max(ctx, len(prompt) + decode_tokens)
    names = ["source"] + [n for n in row_names if n in LLAMA_FTYPES]
    skipped = [n for n in row_names if n not in LLAMA_FTYPES]
    rows: list[dict[str, Any]] = []
    base: list[Any] | None = None
    base_ppl = float("nan")
    with tempfile.TemporaryDirectory(prefix="ferroquant-llamacpp-") as tmp:
        for name in tqdm(names, desc="llama.cpp", unit="row", disable=not progress):
            path, ftype_name = gguf, "as stored"
            t0 = time.perf_counter()
            if name != "source":
                ftype, ftype_name = LLAMA_FTYPES[name]
                path = Path(tmp) / f"{name}.gguf"
                _quantize(llama_cpp, gguf, path, ftype, threads)
            quantize_s = time.perf_counter() - t0
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False,
            )  # fmt: skip
            try:
                logits, scores = _score(llm, ids, windows, base)
                if base is None:
                    base, base_ppl = logits, scores.ppl()
                ptps, dtps = _speeds(llm, prompt, decode_tokens)
                size = int(llm._model.size())
                n_params = int(llm._model.n_params())
            finally:
                if hasattr(llm, "close"):
                    llm.close()
                del llm
            ppl = scores.ppl()
            rows.append(
                {
                    "name": name,
                    "llama_ftype": ftype_name,
                    "bits_per_weight": 8.0 * size / n_params,
                    "size_mb": size / 1e6,
                    "ppl": ppl,
                    "dppl_pct": 100.0 * (ppl / base_ppl - 1.0),
                    "kl": scores.mean_kl(),
                    "top1": scores.top1_rate(),
                    "prompt_tps": ptps,
                    "decode_tps": dtps,
                    "quantize_s": quantize_s,
                }
            )
            if path != gguf:
                os.unlink(path)
    return {
        "stack": f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} (llama.cpp, CPU)",
        "baseline": f"the source GGUF as stored ({gguf.name}), computed in float32 by llama.cpp",
        "note": "files made by llama_model_quantize with allow_requantize from the source GGUF; "
        "llama.cpp's file types also quantize token embeddings / output; q3_k -> Q3_K_S",
        "skipped": skipped,
        "rows": rows,
    }
