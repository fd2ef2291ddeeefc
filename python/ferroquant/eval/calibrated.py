"""The calibrated rows of `ferroquant eval`: `<recipe>+imatrix` (the recipe with llama.cpp's
importance matrix), `alloc@<recipe>` (measured per-tensor allocation at the recipe's size) and
`<recipe>+gptq`, `+awq`, `+awq+gptq` (the calibrated methods, `eval --methods`).

All calibrate on gensim's lee_background.cor (never the held-out lee.cor) through the baseline
model held in float32: the importance matrix over `IMATRIX_CHUNKS` x 512 tokens, the allocator's
sensitivities over `ALLOC_WINDOWS` x 512 tokens, the methods over `METHOD_SAMPLES` x
`METHOD_LEN` tokens (or --calib / --calib-samples / --calib-len) on a float32 copy, cast back to
the baseline's dtype after quantizing. `alloc@q4_k_m` spends exactly the bytes the
q4_k_m row gives the quantized Linears (eval keeps embeddings and the head in bf16), one measured
qtype per Linear, quantized with the importance matrix. Each is computed once per eval run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

IMATRIX_CHUNKS = 32
ALLOC_WINDOWS = 8
METHOD_SAMPLES = 16  # the calibrated methods' windows in eval (their own default is 128 x 512)
METHOD_LEN = 512
CALIBRATED_METHODS = ("gptq", "awq", "awq+gptq")
SUFFIX = "+imatrix"
PREFIX = "alloc@"


class Calibration:
    """Lazily computed importance matrix and allocation measurements for one baseline model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        imatrix_chunks: int = IMATRIX_CHUNKS,
        alloc_windows: int = ALLOC_WINDOWS,
        ctx: int = 512,
        text: Path | None = None,
        method_samples: int = METHOD_SAMPLES,
        method_len: int = METHOD_LEN,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.imatrix_chunks, self.alloc_windows, self.ctx = imatrix_chunks, alloc_windows, ctx
        self.text = text  # the methods' calibration text file (None: lee_background.cor)
        self.method_samples, self.method_len = method_samples, method_len
        self._imatrix: dict[str, np.ndarray] | None = None
        self._measures: list[Any] | None = None

    def _float_copy(self) -> Any:
        import torch

        return copy.deepcopy(self.model).to(torch.float32).eval()

    def imatrix(self) -> dict[str, np.ndarray]:
        """{Linear module name: importance (mean x_j^2 per token)}."""
        if self._imatrix is None:
            from torch import nn

            from ..calib.data import read_calibration_text
            from ..methods.imatrix import chunk_ids, compute_imatrix

            text, _ = read_calibration_text(None)
            ids = chunk_ids(self.tokenizer, text, self.ctx, self.imatrix_chunks, None)
            m = self._float_copy()
            names = {
                n: n
                for n, mod in m.named_modules()
                if isinstance(mod, nn.Linear) and not n.endswith("lm_head")
            }
            im = compute_imatrix(m, ids, names)
            self._imatrix = {k: e.values() for k, e in im.entries.items()}
            del m
        return self._imatrix

    def allocation(self, recipe: str) -> dict[str, str]:
        """{Linear module name: qtype} spending the bytes `recipe` gives the Linears."""
        from torch import nn

        from ..calib import calibration_ids
        from ..methods.allocate import measure_tensor, optimise, tensor_bytes
        from ..methods.sensitivity import measure_sensitivity
        from ..models.recipes import recipe_for

        m = self._float_copy()
        linears = {
            n: mod
            for n, mod in m.named_modules()
            if isinstance(mod, nn.Linear) and not n.endswith("lm_head")
        }
        if self._measures is None:
            imp = self.imatrix()
            ids = calibration_ids(None, self.tokenizer, self.alloc_windows, self.ctx)
            sens = measure_sensitivity(m, ids, {n: n for n in linears})
            self._measures = [
                measure_tensor(n, lin.weight.detach().numpy(), sens[n], imp.get(n))
                for n, lin in linears.items()
            ]
        rule = recipe_for(recipe)
        n_layer = 1 + max((int(p) for n in linears for p in n.split(".") if p.isdigit()), default=0)
        budget = 0
        for n, lin in linears.items():
            q = rule.qtype_for(n, tuple(lin.weight.shape), n_layer)
            budget += tensor_bytes(tuple(lin.weight.shape), q) if q else 0
        del m
        return optimise(self._measures, budget)


def method_copy(model: Any, recipe: str, method: str, cal: Calibration) -> Any:
    """A copy of `model` quantized to `recipe` with a calibrated method (gptq, awq, awq+gptq):
    computed on a float32 copy, returned in the baseline's dtype."""
    from ..models import quantize_model

    q = cal._float_copy()
    quantize_model(
        q, recipe, method=method, calibration=cal.text, tokenizer=cal.tokenizer,
        config={"n_samples": cal.method_samples, "seq_len": cal.method_len}, progress=False,
    )  # fmt: skip
    return q.to(model.dtype)


def calibrated_copy(model: Any, recipe: str, options: dict[str, Any], cal: Calibration) -> Any:
    """A quantized copy of `model` for a `+imatrix` or `alloc@` row."""
    from ..models import quantize_model
    from ..models.recipes import Recipe

    q = copy.deepcopy(model)
    imatrix = cal.imatrix()
    if options.get("allocate"):
        chosen = cal.allocation(recipe)

        class _Chosen(Recipe):
            def qtype_for(self, name: str, shape: tuple[int, ...], n_layer: int) -> str | None:
                return chosen.get(name)

        rule: Any = _Chosen(f"alloc@{recipe}", "q8_0", ("lm_head",))
        return quantize_model(q, rule, progress=False, imatrix=imatrix)
    return quantize_model(q, recipe, progress=False, imatrix=imatrix)
