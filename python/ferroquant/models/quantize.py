"""quantize_model: replace the nn.Linear layers of any torch model by QuantLinear, in place."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from ..nn import QuantLinear, fuse_linears
from ..qtypes import IMATRIX_QTYPES
from .recipes import Recipe, recipe_for

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _count_layers(names: list[str]) -> int:
    idx = [int(m.group(1)) for n in names for m in [_LAYER_INDEX.search(n)] if m]
    return max(idx) + 1 if idx else 1


def quantize_model(
    model: nn.Module,
    recipe: str | Recipe = "q4_k_m",
    *,
    skip: tuple[str, ...] = ("lm_head",),
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
    progress: bool = True,
    method: str = "rtn",
    calibration: Any = None,
    tokenizer: Any = None,
    config: Any = None,
    imatrix: dict[str, Any] | None = None,
    runner: Any = None,
    fuse: bool = True,
    **options: Any,
) -> nn.Module:
    """Quantize every nn.Linear of `model` in place and return it.

    recipe: a mix ("q4_k_m", "q4_k_s", "q5_k_m", ...) or a qtype name; `skip` lists module names
    (or name suffixes) kept unquantized; `filter_fn(name, module)` returning False also keeps a
    module. `options` go to `ferroquant.quantize` (block_size, double_quant, scale_mode).

    method: "rtn" (round to nearest, no data), "gptq", "awq" or "awq+gptq" (calibrated, layer by
    layer, for transformers causal LMs whose decoder layers are an nn.ModuleList) or "hqq"
    (half-quadratic zero-point search, no data; asymmetric grouped integer qtypes such as
    int4_g64, q4_1, q5_1, q2_k, q4_k, q5_k; where a recipe falls back to a format without a
    zero point, that weight keeps round to nearest). `calibration` (calibrated methods): token
    ids or text (str, list of str, a Path; None: gensim's lee_background.cor) cut into
    `config.n_samples` x `config.seq_len` windows; text needs `tokenizer`. `config`: the
    method's dataclass (`ferroquant.methods.GPTQConfig`, `AWQConfig`: grid, duo_scaling, clip,
    ...; `HQQConfig`) or a dict of its fields.
    imatrix: {module name: per-column importance} (llama.cpp's importance matrix values) for
    round to nearest with the ggml quantizers that take one.
    runner: where the calibrated methods' layers, searches and solves run (None: here;
    `ferroquant.distributed.quantize_model` passes its Ray runner; same bytes).
    fuse: sibling QuantLinears that read one input (q/k/v, gate/up) share one stacked weight
    and run as one native call on the CPU (`ferroquant.nn.fuse_linears`; the same outputs).
    Returns the model; `model.ferroquant_plan` maps each module name to the qtype it got and
    `model.ferroquant_method` states the method with its options.
    """
    from ..methods import method_config
    from ..methods.hqq import has_zero_point

    rule = recipe if isinstance(recipe, Recipe) else recipe_for(recipe, skip)
    cfg = method_config(method, config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    n_layer = _count_layers([n for n, _ in linears])
    plan: dict[str, str | None] = {}
    if method.lower() in ("gptq", "awq", "awq+gptq"):
        from ..calib import calibration_ids, find_decoder_layers

        find_decoder_layers(model)  # a clear error before any work
        ids = calibration_ids(calibration, tokenizer, cfg.n_samples, cfg.seq_len)
        if progress:
            print(f"ferroquant: {cfg.describe()} on {ids.shape[0]} x {ids.shape[1]} tokens")

        def qtype_for(name: str, lin: nn.Linear) -> str | None:
            if filter_fn is not None and not filter_fn(name, lin):
                return None
            return rule.qtype_for(name, tuple(lin.weight.shape), n_layer)

        plan.update(
            _calibrated(method.lower(), model, qtype_for, ids, cfg, options, progress, runner)
        )
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    items = linears
    if progress:
        try:
            from tqdm.auto import tqdm

            items = tqdm(linears, desc=f"quantize {rule.name}", unit="layer")
        except ImportError:
            pass
    for name, lin in items:
        q = (
            None
            if filter_fn is not None and not filter_fn(name, lin)
            else rule.qtype_for(name, tuple(lin.weight.shape), n_layer)
        )
        plan[name] = q
        if q is None:
            continue
        # hqq where the format has a zero point; a recipe's fallback (q4_k -> q5_0 for rows
        # that are not whole super-blocks) has none and keeps round-to-nearest
        if method.lower() == "hqq" and has_zero_point(q):
            from ..methods import hqq_quantize

            qt = hqq_quantize(lin.weight, q, cfg)
            new = QuantLinear.from_qtensor(qt, lin.bias).to(lin.weight.device)
        else:
            opts = options if q in ("nf4", "fp4", "int8", "fp8_e4m3", "fp8_e5m2") else {}
            if imatrix is not None and name in imatrix and q in IMATRIX_QTYPES:
                opts = {**opts, "imatrix": imatrix[name]}
            new = QuantLinear.from_linear(lin, q, **opts).to(lin.weight.device)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, new)
    if fuse:  # q/k/v and gate/up as one call each (nn/fused.py; the same bits)
        fuse_linears(model)
    model.ferroquant_plan = plan
    model.ferroquant_method = cfg.describe()
    return model


def _calibrated(method: str, model: nn.Module, qtype_for: Callable, ids: Any, cfg: Any,
                options: dict[str, Any], progress: bool,
                runner: Any = None) -> dict[str, str | None]:  # fmt: skip
    if method == "gptq" and (cfg.true_sequential or cfg.asym_alpha > 0):
        from ..methods.gptq_sequential import sequential_gptq_model

        return sequential_gptq_model(model, qtype_for, ids, cfg, options, progress=progress,
                                     runner=runner)  # fmt: skip
    if method == "gptq":
        from ..methods.layerwise import gptq_model

        return gptq_model(model, qtype_for, ids, cfg, options, progress=progress, runner=runner)
    from ..methods import GPTQConfig
    from ..methods.awq_layers import awq_model

    # AWQ's GPTQ solves on the capture's statistics only (awq_model): plain GPTQ, said so
    gcfg = GPTQConfig(cfg.gptq_damp, cfg.gptq_act_order, n_samples=cfg.n_samples,
                      seq_len=cfg.seq_len, true_sequential=False,
                      asym_alpha=0.0) if cfg.gptq else None  # fmt: skip
    return awq_model(model, qtype_for, ids, cfg, options, gptq=gcfg, progress=progress,
                     runner=runner)  # fmt: skip
