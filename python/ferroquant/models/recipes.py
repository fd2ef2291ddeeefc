"""Mixed-precision recipes: which qtype each weight of a model gets.

The mixes follow llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the llama-family
tensors: a recipe named like a llama.cpp file type (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q3_k_s,
q3_k_m, q3_k_l, q2_k, q6_k, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, iq4_xs, tq1_0, tq2_0) picks the
type of each
tensor as `llama-quantize` does for that file type (no imatrix, not `--pure`):

- the output head, and the token embedding when it doubles as the output head (tied
  embeddings), gets q6_k, or q8_0 where the row length is not a multiple of the file type's
  block size (q8_0 files keep q8_0);
- tq1_0 / tq2_0 (ternary): an untied token embedding gets q4_k; every other weight the ternary
  type;
- attention v and ffn down get more bits in some layers (`use_more_bits`: the first and last
  eighth of the layers and every third layer between; q4_k_s: the first four v and the first
  eighth of ffn down; q3_k_m / q3_k_l / q2_k: their own rules, see `_mix_type`);
- then, where the chosen type cannot hold a row (length not a multiple of its block size), the
  fallback of llama.cpp's `tensor_type_fallback`: q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0,
  iq4_xs -> iq4_nl, q2_k / q3_k / tq1_0 / tq2_0 -> q4_0, f16 when even that does not fit.

Any other qtype name is "pure": every quantized weight gets that qtype (with the fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .._native import QuantizeError
from ..qtypes import qtype_info, qtypes

FALLBACK = {
    # llama.cpp's tensor_type_fallback as of the libllama that llama-cpp-python 0.3.36 ships
    # (checked by tests/test_convert.py); older llama.cpp fell back from q2_k / q3_k to iq4_nl.
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "tq1_0": "q4_0",
    "tq2_0": "q4_0",
    "iq4_xs": "iq4_nl",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}

# llama.cpp file types (llama_ftype, lower case) -> their default tensor type
FTYPE_DEFAULT = {
    "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0",
    "q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k",
    "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs", "tq1_0": "tq1_0", "tq2_0": "tq2_0",
}  # fmt: skip
TERNARY = ("tq1_0", "tq2_0")
MIXES = tuple(k for k in FTYPE_DEFAULT if k.count("_") == 2 or k == "q2_k")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|blk)\.(\d+)\.")

# tensor categories (llama.cpp's tensor_category), by GGUF name part or HF leaf module name
_CATEGORIES = (
    ("output", ("output.weight", "lm_head", "output")),
    ("token_embd", ("token_embd.weight", "embed_tokens", "wte")),
    ("attn_v", ("attn_v.weight", "v_proj")),
    ("attn_k", ("attn_k.weight", "k_proj")),
    ("attn_q", ("attn_q.weight", "q_proj")),
    ("attn_output", ("attn_output.weight", "o_proj")),
    ("ffn_up", ("ffn_up", "up_proj")),
    ("ffn_gate", ("ffn_gate", "gate_proj")),
    ("ffn_down", ("ffn_down", "down_proj", "w2", "fc2")),
)


def category(name: str) -> str:
    """llama.cpp's tensor category of a GGUF tensor name or a Hugging Face module name."""
    if name in ("output.weight", "lm_head", "lm_head.weight", "output"):
        return "output"
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    for cat, keys in _CATEGORIES[1:]:
        if any(k in name if "." in k or k.startswith(("ffn_",)) else k == leaf for k in keys):
            return cat
    return "other"


def _mix_type(ftype: str, default: str, cat: str, i: int, n: int, n_gqa: int) -> str:
    """llama_tensor_get_type_impl for the file types above (no imatrix, not falcon, not MoE)."""
    if cat == "attn_v":
        if ftype == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if ftype == "q3_k_l":
            return "q5_k"
        if ftype in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
            return "q5_k"
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if ftype == "q4_k_s" and i < 4:
            return "q5_k"
    elif cat == "ffn_down":
        if ftype == "q2_k":
            return "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if ftype == "q3_k_l":
            return "q5_k"
        if ftype == "q4_k_m":
            return "q6_k" if use_more_bits(i, n) else default
        if i < n // 8 and ftype in ("iq4_nl", "iq4_xs"):
            return "q5_k"
        if ftype == "q5_k_m" and use_more_bits(i, n):
            return "q6_k"
        if ftype == "q4_k_s" and i < n // 8:
            return "q5_k"
    elif cat == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, default)
    return default


@dataclass
class Recipe:
    """A named rule set: `qtype_for(name, shape, n_layer)` -> qtype or None (keep unquantized).

    `name` is a llama.cpp file type (a mix) or a qtype (pure); `base` the default qtype."""

    name: str
    base: str
    skip: tuple[str, ...] = field(default_factory=lambda: ("lm_head",))
    n_gqa: int = 1

    @property
    def is_mix(self) -> bool:
        return self.name in FTYPE_DEFAULT

    def qtype_for(self, name: str, shape: tuple[int, ...], n_layer: int) -> str | None:
        """The qtype of the weight `name` (a module or GGUF tensor name) of numpy shape `shape`;
        None for a skipped module."""
        if any(s == name or name.endswith("." + s) for s in self.skip):
            return None
        m = _LAYER.search(name)
        return self.tensor_type(name, shape, int(m.group(1)) if m else 0, n_layer)

    def tensor_type(
        self, name: str, shape: tuple[int, ...], i_layer: int, n_layer: int, tied: bool = False
    ) -> str:
        """llama_tensor_get_type: the type of a quantizable tensor; `i_layer` is its layer (the
        index llama.cpp counts for attn_v / ffn_down), `tied` when the token embedding is also
        the output head."""
        cols = int(shape[-1])
        q = self.base
        cat = category(name)
        if self.is_mix:
            if cat == "output" or (tied and cat == "token_embd"):
                if cols % qtype_info(q).block_size:
                    q = "q8_0"
                elif q != "q8_0":
                    q = "q6_k"
            elif cat == "token_embd":
                if self.name in TERNARY:
                    q = "q4_k"
            else:
                q = _mix_type(self.name, q, cat, i_layer, max(n_layer, 1), self.n_gqa)
        return fit(q, cols)


def fit(qtype: str, cols: int) -> str:
    """The qtype itself if rows of `cols` weights hold whole blocks, else llama.cpp's fallback."""
    q = qtype
    if cols % qtype_info(q).block_size:
        q = FALLBACK.get(q, "f16")
        if cols % qtype_info(q).block_size:
            q = "f16"
    return q


def recipe_for(name: str, skip: tuple[str, ...] = ("lm_head",), n_gqa: int = 1) -> Recipe:
    """A recipe by name: a llama.cpp file type (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q3_k_m, q2_k,
    q8_0, ...) or any qtype (then every weight gets it)."""
    key = name.lower()
    if key in FTYPE_DEFAULT:
        return Recipe(key, FTYPE_DEFAULT[key], skip, n_gqa)
    try:
        info = qtype_info(key)
    except QuantizeError:
        raise QuantizeError(unknown_recipe_message(name)) from None
    return Recipe(info.name, info.name, skip, n_gqa)


def unknown_recipe_message(name: str) -> str:
    """What an unknown recipe name gets told: the mixes and the qtypes a recipe may be."""
    return (
        f"unknown qtype or mix {name!r}; mixes (llama.cpp file types, per-tensor rules): "
        f"{' '.join(MIXES)}; qtypes (every weight the same): {' '.join(q.name for q in qtypes())}"
    )
