"""Model and text loading for `ferroquant eval`: a Hugging Face checkpoint folder or a GGUF file
(through transformers) held in bf16, and the held-out text (default: gensim's lee.cor)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._extras import require
from ..defaults import (
    EVAL_TEXT,
    default_model_path,
    default_text_path,
    read_text_file,
    resolve_model,
)

__all__ = [
    "Loaded",
    "default_model_path",
    "default_text_path",
    "load_model",
    "read_text",
    "resolve_model",
    "tokenize",
]


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str  # what MODEL was
    baseline: str  # what the baseline weights are


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, description). The default lee.cor is latin-1; other files UTF-8, else latin-1."""
    return read_text_file(path, EVAL_TEXT, "held-out")


def _gguf_weight_type(name: str) -> str:
    m = re.search(r"[.-](I?Q\d_[A-Z0-9_]+|Q\d_\d|F16|F32|BF16)\.gguf$", name, re.IGNORECASE)
    return m.group(1).upper() if m else "GGUF"


def load_model(model: str | Path | None) -> Loaded:
    """An HF checkpoint folder or a .gguf file (None: the default) as a bf16 torch model."""
    folder, gguf_file = resolve_model(model)
    torch = require("torch", "ferroquant eval", "eval")
    transformers = require("transformers", "ferroquant eval", "eval")
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
