"""`ferroquant eval`: what each precision costs in quality and gains in size and speed, measured on
a real language model and real held-out text.

Protocol (every output states it):
- The baseline is the model's weights held in bf16 (for a GGUF file: its weights as transformers
  dequantizes them, e.g. the default's Q4_1 weights, then cast to bf16). Every other row quantizes
  a fresh copy of that baseline with `quantize_model(model, recipe)`; embeddings and the output head
  (tied to the embeddings in the default model) stay bf16. Where a format cannot hold a tensor
  (a K-quant needs rows that are a multiple of 256) the recipe falls back as llama.cpp does, and
  the row reports the qtypes actually used.
- The text is tokenized once without special tokens and cut into windows of `ctx` tokens that
  start every `stride` tokens; each token is scored once, in the first window that reaches it
  (Hugging Face's sliding-window perplexity; with stride = ctx every token of a window but its
  first). At most `max_tokens` tokens are scored (0: the whole text).
- Metrics against the baseline's next-token distributions on the same windows, in float64 from
  log-softmax: perplexity, mean KL(baseline || row) over scored tokens, top-1 agreement.
- Size: quantized Linear weights as stored (blocks and statistics), every other parameter as held
  (bf16), tied parameters once; bits per weight over all parameters.
- Speed on the CPU with `threads` threads: prompt = one forward over `prompt_tokens` tokens (best
  of two), decode = `decode_tokens` greedy steps with the KV cache after that prompt.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._extras import require
from ..defaults import (
    DEFAULT_GGUF,
    DEFAULT_MODEL_PACKAGE,
    default_model_path,
    default_text_path,
    resolve_model,
)
from ..models.recipes import recipe_for
from .load import Loaded, load_model, read_text, tokenize
from .metrics import Scores, Window, make_windows

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_MODEL_PACKAGE",
    "DEFAULT_ROWS",
    "Loaded",
    "RowSpec",
    "Scores",
    "Window",
    "default_model_path",
    "default_text_path",
    "load_model",
    "make_windows",
    "parse_rows",
    "read_text",
    "resolve_model",
    "row_spec",
    "run_eval",
    "stored_bytes",
    "tokenize",
]

DEFAULT_ROWS = (
    "bf16", "fp8_e4m3", "int8", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "nf4", "nf4+dq",
    "q3_k", "q2_k",
)  # fmt: skip
BASELINE = "bf16"
_DQ_NAMES = ("nf4+dq", "nf4_dq", "nf4-dq")
_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "f16", "torch.float32": "f32"}


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: `recipe` (a mix or qtype name, None for the baseline) + options."""

    name: str
    recipe: str | None
    options: dict[str, Any] = field(default_factory=dict)


def row_spec(name: str) -> RowSpec:
    """The row called `name` (bf16, nf4+dq, or any recipe/qtype name); ValueError if unknown."""
    key = name.strip().lower()
    if key == BASELINE:
        return RowSpec(BASELINE, None)
    if key in _DQ_NAMES:
        return RowSpec("nf4+dq", "nf4", {"double_quant": True})
    recipe_for(key)  # QuantizeError (a ValueError) naming the known qtypes
    return RowSpec(key, key)


def parse_rows(names: str | list[str] | tuple[str, ...] | None) -> list[RowSpec]:
    """Row specs for a comma-separated string or a list; the baseline always comes first."""
    if names is None:
        names = list(DEFAULT_ROWS)
    elif isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    specs = [row_spec(n) for n in names]
    out = [RowSpec(BASELINE, None)]
    for s in specs:
        if s.name not in {o.name for o in out}:
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# one row


def stored_bytes(model: Any, double_quant: bool = False) -> tuple[int, int, dict[str, int]]:
    """(bytes as stored, weights, tensors per storage type) of `model`'s parameters.

    QuantLinear: its blocks and statistics; with bitsandbytes double quantization the statistics
    count as bitsandbytes stores them (one uint8 per block, one float32 per 256 blocks, the float32
    offset), although QuantLinear holds them expanded. Every other parameter: as held (bf16 for the
    baseline), each tied parameter once.
    """
    from ..nn import QuantLinear

    total = weights = 0
    counts: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            nbytes = mod.qweight.numel() + mod.qstats.numel() * 4
            if double_quant and mod.qtype in ("nf4", "fp4"):
                blocks = mod.qstats.numel()
                nbytes = mod.qweight.numel() + blocks + 4 * math.ceil(blocks / 256) + 4
            total += nbytes
            weights += mod.in_features * mod.out_features
            counts[mod.qtype] = counts.get(mod.qtype, 0) + 1
    for p in model.parameters():  # deduplicated: a tied lm_head counts once
        total += p.numel() * p.element_size()
        weights += p.numel()
        if p.dim() == 2:
            key = f"{_DTYPE_NAMES.get(str(p.dtype), str(p.dtype))} (kept)"
            counts[key] = counts.get(key, 0) + 1
    return total, weights, counts


def _kernel(model: Any) -> str:
    from ..nn import QuantLinear
    from ..nn.ops import native_kernel_available

    q = {m.qtype for m in model.modules() if isinstance(m, QuantLinear)}
    if not q:
        return "torch"
    native = {t for t in q if native_kernel_available(t)}
    if native == q:
        return "native"
    if not native:
        return "fallback"
    return "native: " + ",".join(sorted(native)) + "; fallback: " + ",".join(sorted(q - native))


def run_windows(model: Any, ids: Any, windows: list[Window], bar: Any = None) -> list[Any]:
    """The logits that predict each window's targets, one [n_scored, V] tensor per window."""
    import torch

    out = []
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=ids[None, w.start : w.end], use_cache=False).logits[0]
            out.append(logits[w.first - w.start - 1 : w.end - w.start - 1].clone())
            if bar is not None:
                bar.update(1)
    return out


def prompt_speed(model: Any, prompt: Any, repeats: int = 2) -> float:
    """Tokens/s of one forward over `prompt` (1-D ids), best of `repeats`."""
    import torch

    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=prompt[None], use_cache=False)
            best = min(best, time.perf_counter() - t0)
    return prompt.shape[0] / best


def decode_speed(model: Any, prompt: Any, n_decode: int) -> tuple[float, list[int]]:
    """Tokens/s of `n_decode` greedy steps with the KV cache after `prompt` (not timed)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=prompt[None], use_cache=True)
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        tokens = []
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
            tokens.append(int(nxt))
        dt = time.perf_counter() - t0
    return n_decode / dt, tokens


@dataclass
class Row:
    name: str
    recipe: str | None
    qtypes_used: dict[str, int]
    kernel: str
    bits_per_weight: float
    size_mb: float
    ppl: float
    dppl_pct: float
    kl: float
    top1: float
    prompt_tps: float
    decode_tps: float
    quantize_s: float


def quantized_copy(model: Any, spec: RowSpec, progress: bool) -> Any:
    if spec.recipe is None:
        return model
    from ..models import quantize_model

    q = copy.deepcopy(model)
    return quantize_model(q, spec.recipe, progress=progress, **spec.options)


# ---------------------------------------------------------------------------------------------
# the whole eval


def run_eval(
    model: str | Path | None = None,
    *,
    rows: str | list[str] | None = None,
    text: str | Path | None = None,
    ctx: int = 512,
    stride: int | None = None,
    max_tokens: int = 2048,
    prompt_tokens: int = 128,
    decode_tokens: int = 16,
    threads: int | None = None,
    progress: bool = True,
    against: str | None = None,
    loaded: Loaded | None = None,
) -> dict[str, Any]:
    """Evaluate every row; returns {"protocol": {...}, "rows": [{...}, ...]} (see module doc)."""
    # every argument is checked before the model loads
    specs = parse_rows(rows)
    stride = ctx if stride is None else stride
    make_windows(2, ctx, stride, max_tokens)  # the checks of ctx, stride, max_tokens
    if prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError("--prompt-tokens and --decode-tokens must be at least 1")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if against not in (None, "llama.cpp"):
        raise ValueError(f"--against: only llama.cpp is supported, got {against!r}")
    if loaded is None or against:
        _, gguf_file = resolve_model(model)
        if against and gguf_file is None:
            raise ValueError("--against llama.cpp needs a .gguf MODEL (llama.cpp reads GGUF)")
    txt, text_desc = read_text(text)
    torch = require("torch", "ferroquant eval", "eval")
    from .. import set_num_threads

    if threads is not None:
        torch.set_num_threads(threads)
        set_num_threads(threads)
    n_threads = torch.get_num_threads()
    load_avg_start = _loadavg()
    t_load = time.perf_counter()
    loaded = loaded or load_model(model)
    load_s = time.perf_counter() - t_load
    ids = tokenize(loaded.tokenizer, txt)
    windows = make_windows(int(ids.shape[0]), ctx, stride, max_tokens)
    prompt = ids[: min(prompt_tokens, int(ids.shape[0]))]
    from tqdm.auto import tqdm

    base = loaded.model
    n_scored = sum(w.n_scored for w in windows)
    results: list[Row] = []
    base_logits: list[Any] = []
    base_scores: Scores | None = None
    for spec in tqdm(specs, desc="eval", unit="row", disable=not progress):
        t0 = time.perf_counter()
        qmodel = quantized_copy(base, spec, progress)
        quantize_s = time.perf_counter() - t0 if spec.recipe is not None else 0.0
        with tqdm(
            total=len(windows), desc=f"score {spec.name}", unit="win", leave=False,
            disable=not progress,
        ) as bar:  # fmt: skip
            logits = run_windows(qmodel, ids, windows, bar)
        if spec.recipe is None:
            base_logits = logits
        scores = Scores()
        for w, lg, bl in zip(windows, logits, base_logits, strict=True):
            scores.add(lg, bl, ids[w.first : w.end])
        if spec.recipe is None:
            base_scores = scores
        assert base_scores is not None
        del logits
        ptps = prompt_speed(qmodel, prompt)
        dtps, _ = decode_speed(qmodel, prompt, decode_tokens)
        nbytes, nweights, counts = stored_bytes(qmodel, spec.options.get("double_quant", False))
        ppl = scores.ppl()
        results.append(
            Row(
                name=spec.name,
                recipe=spec.recipe,
                qtypes_used=counts,
                kernel=_kernel(qmodel),
                bits_per_weight=8.0 * nbytes / nweights,
                size_mb=nbytes / 1e6,
                ppl=ppl,
                dppl_pct=100.0 * (ppl / base_scores.ppl() - 1.0),
                kl=scores.mean_kl(),
                top1=scores.top1_rate(),
                prompt_tps=ptps,
                decode_tps=dtps,
                quantize_s=quantize_s,
            )
        )
        if qmodel is not base:
            del qmodel

    protocol = {
        "model": loaded.source,
        "baseline": f"bf16: {loaded.baseline}",
        "kept_unquantized": "embeddings and the output head (tied to the embeddings when the "
        "model ties them) stay bf16; norms stay bf16",
        "text": text_desc,
        "text_tokens": int(ids.shape[0]),
        "tokenization": "no special tokens (no BOS)",
        "formats": "ggml types as llama.cpp stores them; int8 / fp8_e4m3 with one float32 scale "
        "per row; nf4 blocks of 64 with float32 absmax; nf4+dq: bitsandbytes double quantization "
        "of the absmax (counted as stored, expanded to float32 in memory)",
        "ctx": ctx,
        "stride": stride,
        "windows": len(windows),
        "tokens_scored": n_scored,
        "max_tokens": max_tokens,
        "metrics": "KL(baseline || row) and top-1 agreement against the baseline's next-token "
        "distributions on the same windows, float64 log-softmax, mean over scored tokens",
        "size": "quantized Linear blocks + statistics as stored, other parameters as held (bf16), "
        "tied parameters once; MB = 10^6 bytes",
        "prompt_tokens": int(prompt.shape[0]),
        "decode_tokens": decode_tokens,
        "speed": f"CPU, torch {torch.__version__}, activations bf16; prompt: one forward over "
        f"{int(prompt.shape[0])} tokens (best of 2); decode: {decode_tokens} greedy steps with "
        "the KV cache after that prompt",
        "threads": n_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_average": {"start": load_avg_start, "end": _loadavg()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ferroquant": __version__,
        "model_load_s": round(load_s, 1),
    }
    out: dict[str, Any] = {"protocol": protocol, "rows": [asdict(r) for r in results]}
    if against == "llama.cpp":
        from .llamacpp import run_llamacpp

        folder, gguf_file = resolve_model(model)
        assert gguf_file is not None
        out["against"] = {
            "llama.cpp": run_llamacpp(
                folder / gguf_file,
                [s.name for s in specs],
                ids.tolist(),
                windows,
                prompt.tolist(),
                decode_tokens,
                n_threads,
                progress,
            )
        }
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
