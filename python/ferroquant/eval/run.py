"""`ferroquant eval`: what each precision costs in quality and gains in size and speed, measured on
a real language model and real held-out text.

Protocol (every output states it):
- The baseline is the model's weights held in bf16 (for a GGUF file: its weights as transformers
  dequantizes them, e.g. the default's Q4_1 weights, then cast to bf16). Every other row quantizes
  a fresh copy of that baseline with `quantize_model(model, recipe)`; embeddings and the output head
  (tied to the embeddings in the default model) stay bf16. Where a format cannot hold a tensor
  (a K-quant needs rows that are a multiple of 256) the recipe falls back as llama.cpp does, and
  the row reports the qtypes actually used; a row that ends up with no tensor of the qtype it is
  named after (SmolLM2's 576-wide rows turn the whole q2_k mix into q4_0 + q3_k) is marked.
- `QTYPE+gptq` / `+awq` / `+awq+gptq` rows (`--methods`) quantize a float32 copy on the
  calibration text (never the held-out text; `calibration` in the protocol: text, windows, each
  method's config) and cast it back to bf16; `QTYPE+hqq` needs no data.
- The text is tokenized once without special tokens and cut into windows of `ctx` tokens that
  start every `stride` tokens; each token is scored once, in the first window that reaches it
  (Hugging Face's sliding-window perplexity; with stride = ctx every token of a window but its
  first). At most `max_tokens` tokens are scored (0: the whole text).
- Metrics against the baseline's next-token distributions on the same windows, in float64 from
  log-softmax: perplexity, mean KL(baseline || row) over scored tokens, top-1 agreement.
- Size: quantized Linear weights as stored (blocks and statistics), every other parameter as held
  (bf16), tied parameters once; bits per weight over all parameters.
- Speed on the CPU with `threads` threads, median of `speed_runs` rounds with the rows
  interleaved (`speed.py`): prompt = one forward over `prompt_tokens` tokens (in transformers
  right after an untimed one of the same row: `speed.torch_prompt`), decode =
  `decode_tokens` greedy steps with the KV cache after that prompt; in ferroquant's native
  runtime on a temporary GGUF file of the row (rows GGUF cannot hold: none) and, as secondary
  columns, in transformers + QuantLinear.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._extras import require
from .._native import QuantizeError
from ..defaults import (
    DEFAULT_GGUF,
    DEFAULT_MODEL_PACKAGE,
    default_model_path,
    default_text_path,
    resolve_model,
)
from ..models.recipes import recipe_for
from ..qtypes import IMATRIX_QTYPES, qtype_info
from .calibrated import (
    CALIBRATED_METHODS,
    METHOD_LEN,
    METHOD_SAMPLES,
    PREFIX,
    SUFFIX,
    Calibration,
    calibrated_copy,
    method_copy,
)
from .load import Loaded, load_model, read_text, tokenize
from .metrics import Scores, Window, make_windows
from .speed import SpeedRow, measure, write_gguf

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
# row-name suffixes naming a method (awq+gptq before gptq: the longest match wins); rtn is the
# plain row
ROW_METHODS = ("awq+gptq", "gptq", "awq", "hqq")
_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "f16", "torch.float32": "f32"}


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: `recipe` (a mix or qtype name, None for the baseline) + options."""

    name: str
    recipe: str | None
    options: dict[str, Any] = field(default_factory=dict)


def row_spec(name: str) -> RowSpec:
    """The row called `name` (bf16, nf4+dq, any recipe/qtype name, or QTYPE+hqq); ValueError if
    unknown."""
    key = name.strip().lower()
    if key == BASELINE:
        return RowSpec(BASELINE, None)
    if key in _DQ_NAMES:
        return RowSpec("nf4+dq", "nf4", {"double_quant": True})
    for method in ROW_METHODS:  # QTYPE+METHOD: the same recipe quantized by that method
        if key.endswith("+" + method):
            recipe_for(key[: -len(method) - 1])
            return RowSpec(key, key[: -len(method) - 1], {"method": method})
    options: dict[str, Any] = {}
    recipe = key
    if key.endswith(SUFFIX):
        recipe, options = key.removesuffix(SUFFIX), {"calibrated": True}
    elif key.startswith(PREFIX):
        recipe, options = key.removeprefix(PREFIX), {"calibrated": True, "allocate": True}
    try:
        info = recipe_for(recipe)
    except QuantizeError as e:  # it names the mixes and qtypes; eval rows take more names
        raise QuantizeError(
            f"{e}; eval rows also: {BASELINE} (the baseline), nf4+dq, "
            f"{', '.join('QTYPE+' + m for m in ROW_METHODS)}, "
            f"<ggml recipe>{SUFFIX}, {PREFIX}<ggml recipe>"
        ) from None
    if options and info.base not in IMATRIX_QTYPES and info.base != "q8_0":
        raise QuantizeError(f"{key}: {SUFFIX} / {PREFIX} rows need a ggml recipe, got {recipe}")
    return RowSpec(key, recipe, options)


def parse_rows(
    names: str | list[str] | tuple[str, ...] | None,
    methods: str | list[str] | tuple[str, ...] | None = None,
) -> list[RowSpec]:
    """Row specs for a comma-separated string or a list; the baseline always comes first.
    `methods` (rtn, gptq, awq, awq+gptq, hqq): every plain row becomes one row per method,
    `QTYPE` for rtn and `QTYPE+METHOD` for the others (rows already naming a method or option
    stay as they are); an unknown method is a QuantizeError before anything loads."""
    if names is None:
        names = list(DEFAULT_ROWS)
    elif isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    specs = [row_spec(n) for n in names]
    if methods is not None:
        from ..methods import method_config

        if isinstance(methods, str):
            methods = [m for m in methods.split(",") if m.strip()]
        methods = [m.strip().lower() for m in methods]
        if not methods:
            raise QuantizeError("--methods names no method")
        for m in methods:
            method_config(m)  # QuantizeError naming the known methods
        specs = [
            x
            for s in specs
            for x in (
                [s if m == "rtn" else row_spec(f"{s.name}+{m}") for m in methods]
                if s.recipe is not None and not s.options
                else [s]
            )
        ]
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
    quantize_s: float
    named_qtype: str | None  # the qtype the row is named after (a mix: its default type)
    named_qtype_absent: bool  # True when no tensor of the model got the named qtype
    note: str | None  # what the row holds instead, when named_qtype_absent


def quantized_copy(
    model: Any, spec: RowSpec, progress: bool, calibration: Calibration | None = None
) -> Any:
    if spec.recipe is None:
        return model
    if spec.options.get("calibrated"):
        if calibration is None:
            raise ValueError(f"row {spec.name} needs the model's tokenizer (calibration)")
        return calibrated_copy(model, spec.recipe, spec.options, calibration)
    if spec.options.get("method") in CALIBRATED_METHODS:
        if calibration is None:
            raise ValueError(f"row {spec.name} needs the model's tokenizer (calibration)")
        return method_copy(model, spec.recipe, spec.options["method"], calibration)
    from ..models import quantize_model

    q = copy.deepcopy(model)
    return quantize_model(q, spec.recipe, progress=progress, **spec.options)


def named_qtype(spec: RowSpec) -> str | None:
    """The qtype a row is named after: the qtype itself, or a mix's default type (q4_k_m: q4_k;
    q2_k: q2_k); None for the baseline."""
    return None if spec.recipe is None else recipe_for(spec.recipe).base


def absent_note(spec: RowSpec, model: Any, counts: dict[str, int]) -> str | None:
    """None when some quantized tensor of `model` has the row's named qtype; else one line
    saying so, why (the row lengths that cannot hold its blocks; the mix's own rules for the
    rest) and what the row holds instead, e.g. "q2_k: no q2_k tensor on this model (576-wide
    rows): q4_0 x180, q3_k x30"."""
    from ..nn import QuantLinear

    named = named_qtype(spec)
    if named is None or counts.get(named, 0) > 0:
        return None
    block = qtype_info(named).block_size
    widths = set()
    by_rule = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.in_features % block:
                widths.add(m.in_features)
            else:
                by_rule += 1
    why = []
    if widths:
        why.append(", ".join(str(w) for w in sorted(widths)) + "-wide rows")
    if by_rule:
        why.append(f"{by_rule} by the {spec.name} mix's own rules")
    held = ", ".join(
        f"{q} x{n}" for q, n in sorted(counts.items(), key=lambda kv: -kv[1])
        if not q.endswith("(kept)")
    )  # fmt: skip
    return f"{spec.name}: no {named} tensor on this model ({'; '.join(why)}): {held}"


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
    speed_runs: int = 3,
    progress: bool = True,
    against: str | None = None,
    loaded: Loaded | None = None,
    methods: str | list[str] | None = None,
    calib: str | Path | None = None,
    calib_samples: int = METHOD_SAMPLES,
    calib_len: int = METHOD_LEN,
) -> dict[str, Any]:
    """Evaluate every row; returns {"protocol": {...}, "rows": [{...}, ...]} (see module doc).
    `methods`: one row per method and row (parse_rows); `calib`, `calib_samples`, `calib_len`:
    the calibrated methods' text file (None: lee_background.cor) and windows."""
    # every argument is checked before the model loads
    specs = parse_rows(rows, methods)
    calib_rows = [s for s in specs if s.options.get("method") in CALIBRATED_METHODS]
    calib_desc = _calibration_protocol(calib_rows, calib, text, calib_samples, calib_len)
    stride = ctx if stride is None else stride
    make_windows(2, ctx, stride, max_tokens)  # the checks of ctx, stride, max_tokens
    if prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError("--prompt-tokens and --decode-tokens must be at least 1")
    if speed_runs < 1:
        raise ValueError(f"--speed-runs must be at least 1, got {speed_runs}")
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
    tok_source: Any = None
    if loaded is None:
        folder, gguf_file = resolve_model(model)
        tok_source = folder / gguf_file if gguf_file else folder
    loaded = loaded or load_model(model)
    tok_source = tok_source or loaded.tokenizer
    load_s = time.perf_counter() - t_load
    ids = tokenize(loaded.tokenizer, txt)
    windows = make_windows(int(ids.shape[0]), ctx, stride, max_tokens)
    prompt = ids[: min(prompt_tokens, int(ids.shape[0]))]
    from tqdm.auto import tqdm

    base = loaded.model
    calibration = Calibration(
        base, loaded.tokenizer, text=None if calib is None else Path(calib),
        method_samples=calib_samples, method_len=calib_len,
    )  # fmt: skip
    n_scored = sum(w.n_scored for w in windows)
    results: list[Row] = []
    timed: list[SpeedRow] = []
    base_logits: list[Any] = []
    base_scores: Scores | None = None
    with tempfile.TemporaryDirectory(prefix="ferroquant-eval-") as tmp:
        for spec in tqdm(specs, desc="eval", unit="row", disable=not progress):
            t0 = time.perf_counter()
            qmodel = quantized_copy(base, spec, progress, calibration)
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
            nbytes, nweights, counts = stored_bytes(qmodel, spec.options.get("double_quant", False))
            gguf_path = Path(tmp) / f"row{len(timed)}.gguf"
            why_not = write_gguf(qmodel, gguf_path, tok_source)
            timed.append(SpeedRow(spec.name, qmodel, None if why_not else gguf_path, why_not))
            note = absent_note(spec, qmodel, counts)
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
                    quantize_s=quantize_s,
                    named_qtype=named_qtype(spec),
                    named_qtype_absent=note is not None,
                    note=note,
                )
            )
        with tqdm(
            total=len(timed) * speed_runs, desc="speed", unit="row", disable=not progress
        ) as bar:
            measure(timed, prompt, decode_tokens, n_threads, speed_runs, bar)
    row_dicts = [{**asdict(r), **t.medians()} for r, t in zip(results, timed, strict=True)]
    del timed

    base_rt = row_dicts[0]["runtime_weights"] or row_dicts[0]["runtime_note"]
    protocol = {
        "model": loaded.source,
        "baseline": f"bf16: {loaded.baseline}",
        "kept_unquantized": "embeddings and the output head (tied to the embeddings when the "
        "model ties them) stay bf16; norms stay bf16",
        "text": text_desc,
        "text_tokens": int(ids.shape[0]),
        "tokenization": "no special tokens (no BOS)",
        "calibration": calib_desc,
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
        "speed_runs": speed_runs,
        "speed": f"CPU, median of {speed_runs} rounds, each round visiting every row once "
        "(rows interleaved; the two engines' order alternates by round); prompt: one forward "
        f"over {int(prompt.shape[0])} tokens; decode: {decode_tokens} greedy steps with the KV "
        "cache after that prompt",
        "speed_runtime": "prompt tok/s and decode tok/s: ferroquant's native runtime "
        "(ferroquant.runtime.LlamaRuntime) on a temporary GGUF file of the row's own weights "
        "(written by save_gguf_model, deleted after the run), loaded afresh each round, one short "
        "warm-up generation before the timed one; the KV cache is f32. What the runtime did with "
        "the baseline's weights: " + str(base_rt),
        "speed_runtime_missing": _missing(row_dicts),
        "speed_transformers": f"hf prompt / hf decode: transformers + QuantLinear, torch "
        f"{torch.__version__}, activations bf16, the model as scored; hf prompt: the second of "
        "two forwards over the prompt (the first untimed); hf decode: per-token Python overhead "
        "included",
        "threads": n_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu": _cpu_name(),
        "load_average": {"start": load_avg_start, "end": _loadavg()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ferroquant": __version__,
        "model_load_s": round(load_s, 1),
    }
    out: dict[str, Any] = {"protocol": protocol, "rows": row_dicts}
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


def _calibration_protocol(
    specs: list[RowSpec], calib: str | Path | None, text: str | Path | None, samples: int,
    seq_len: int,
) -> str | None:  # fmt: skip
    """The protocol line of the calibrated-method rows (None without any); ValueError for a
    calibration text that is the held-out text or windows that cannot be cut."""
    if not specs:
        return None
    from ..calib.data import read_calibration_text
    from ..methods import method_config

    if samples < 1 or seq_len < 2:
        raise ValueError(f"--calib-samples must be >= 1 and --calib-len >= 2, got {samples} x "
                         f"{seq_len}")  # fmt: skip
    held_out = Path(text) if text is not None else default_text_path()
    if calib is not None and Path(calib).resolve() == held_out.resolve():
        raise ValueError(f"--calib {calib} is the held-out text: calibrate on other text")
    _, desc = read_calibration_text(None if calib is None else Path(calib))
    cfgs = sorted({method_config(s.options["method"], n_samples=samples, seq_len=seq_len)
                   .describe() for s in specs})  # fmt: skip
    return (
        f"rows +gptq / +awq / +awq+gptq: calibrated on {desc}, {samples} x {seq_len} tokens "
        f"(the model's tokenizer, never the held-out text), on a float32 copy of the baseline "
        f"cast back to bf16 after quantizing; {'; '.join(cfgs)}"
    )


def _missing(rows: list[dict[str, Any]]) -> str | None:
    """Which rows have no runtime figures and why, rows with the same reason together."""
    why: dict[str, list[str]] = {}
    for r in rows:
        if r["prompt_tps"] is None:
            why.setdefault(str(r["runtime_note"]), []).append(r["name"])
    if not why:
        return None
    return "no runtime figures ('–') for " + "; ".join(
        f"{', '.join(names)} ({reason})" for reason, names in why.items()
    )


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
