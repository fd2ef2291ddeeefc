"""Mixed-precision recipes: which qtype each Linear of a model gets.

The K-quant mixes follow llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the
tensors a Hugging Face decoder has as nn.Linear: attention v and ffn down projections of some
layers get more bits (`use_more_bits`: the first and last eighth of the layers and every third
layer between), the output head gets q6_k. Where a K-quant cannot hold a tensor (rows not a
multiple of 256) the fallback is llama.cpp's: q2_k/q3_k/iq4_xs -> iq4_nl, q4_k -> q5_0,
q5_k -> q5_1, q6_k -> q8_0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..qtypes import qtype_info

FALLBACK = {
    "q2_k": "iq4_nl",
    "q3_k": "iq4_nl",
    "iq4_xs": "iq4_nl",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}

# recipe -> (base qtype, qtype for "more bits" tensors (v/down in use_more_bits layers), output)
MIXES = {
    "q4_k_m": ("q4_k", "q6_k", "q6_k"),
    "q4_k_s": ("q4_k", "q5_k", "q6_k"),
    "q5_k_m": ("q5_k", "q6_k", "q6_k"),
    "q5_k_s": ("q5_k", "q5_k", "q6_k"),
    "q3_k_m": ("q3_k", "q4_k", "q6_k"),
    "q2_k": ("q2_k", "q3_k", "q6_k"),
}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class Recipe:
    """A named rule set: `qtype_for(name, shape, n_layer)` -> qtype or None (keep unquantized)."""

    name: str
    base: str
    more_bits: str
    output: str | None
    skip: tuple[str, ...] = field(default_factory=lambda: ("lm_head",))

    def qtype_for(self, name: str, shape: tuple[int, int], n_layer: int) -> str | None:
        if any(s == name or name.endswith("." + s) for s in self.skip):
            return None
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "output"):
            q = self.output
        else:
            q = self.base
            m = _LAYER.search(name)
            if m and self.more_bits != self.base and leaf in ("v_proj", "down_proj", "w2", "fc2"):
                if use_more_bits(int(m.group(1)), max(n_layer, 1)):
                    q = self.more_bits
        return fit(q, shape[-1]) if q else None


def fit(qtype: str, cols: int) -> str:
    """The qtype itself if rows of `cols` weights hold whole blocks, else llama.cpp's fallback."""
    q = qtype
    while cols % qtype_info(q).block_size:
        q = FALLBACK.get(q, "f16")
    return q


def recipe_for(name: str, skip: tuple[str, ...] = ("lm_head",)) -> Recipe:
    """A recipe by name: a mix (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q3_k_m, q2_k) or any qtype."""
    key = name.lower()
    if key in MIXES:
        base, more, out = MIXES[key]
        return Recipe(key, base, more, out, skip)
    info = qtype_info(key)  # raises QuantizeError for an unknown name
    return Recipe(info.name, info.name, info.name, info.name, skip)
