"""QLoRA: peft's LoRA over QuantLinear (a frozen quantized base, float low-rank adapters), and
`merge_lora`, which folds the adapters into the weights and quantizes them again.

peft learns about QuantLinear through its custom-module mapping
(`LoraConfig._register_custom_module`): `lora_config` returns a config carrying it, so a plain
`peft.get_peft_model(model, lora_config(...))` wraps every targeted QuantLinear in
`QuantLoraLinear`. The base's forward is QuantLinear's (while training: the weight dequantized
for the call, `ferroquant::dequant_matmul`); its backward gives the input gradient through
`ferroquant::qmatmul_grad_input`, so the adapters of every layer train while no float copy of
any base weight is kept between calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._extras import require
from ..nn import QuantLinear
from ..qtypes import qtype_info
from ..tensor import QuantizeError

_peft = require("peft", "QLoRA (ferroquant.train.lora)", "eval")
from peft.tuners.lora import LoraConfig, LoraLayer  # noqa: E402 (after the named-extra check)


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA adapters beside a frozen QuantLinear: y = base(x) + B(A(dropout(x))) * scaling.
    Plain LoRA only (no DoRA or other variants: they need the float weight)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora or getattr(config, "velora_config", None) is not None:
            raise ValueError("LoRA over QuantLinear supports plain LoRA only (no DoRA, VeLoRA)")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, a.weight.dtype)
            delta = b(a(self.lora_dropout[name](xa))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def delta_weight(self) -> torch.Tensor:
        """The active adapters' sum of scaling * B @ A (out x in, float32)."""
        base = self.get_base_layer()
        delta = torch.zeros(base.out_features, base.in_features)
        for name in self.active_adapters:
            if name in self.lora_A:
                a = self.lora_A[name].weight.detach().float().cpu()
                b = self.lora_B[name].weight.detach().float().cpu()
                delta += (b @ a) * self.scaling[name]
        return delta

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
) -> LoraConfig:
    """A causal-LM LoraConfig (alpha defaults to 2r) that knows QuantLinear."""
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    cfg._register_custom_module({QuantLinear: QuantLoraLinear})
    return cfg


def check_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> None:
    """A ValueError naming every target that matches no module of `model` (by name or name
    suffix, as peft matches them) and listing the Linear-like names it has; a QuantizeError
    (a ValueError) for a model without any Linear or QuantLinear layer."""
    if not any(isinstance(m, (nn.Linear, QuantLinear)) for m in model.modules()):
        raise QuantizeError(
            f"{type(model).__name__} has no nn.Linear or QuantLinear layers for LoRA adapters"
        )
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, QuantLinear))
            }  # fmt: skip
        )
        raise ValueError(
            f"LoRA target {', '.join(repr(t) for t in missing)} matches no module of the model; "
            f"its linear layers are named {', '.join(linear) or '(none)'}"
        )


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
) -> Any:
    """peft.get_peft_model over `model` (its QuantLinear layers frozen, the adapters trainable);
    checks the targets first."""
    check_targets(model, targets)
    return _peft.get_peft_model(model, lora_config(r, alpha, dropout, targets))


def merge_lora(
    model: nn.Module,
    qtype: str | None = None,
    *,
    method: str = "rtn",
    calibration: Any = None,
    tokenizer: Any = None,
    config: Any = None,
    **options: Any,
) -> nn.Module:
    """Fold every LoRA adapter into its layer and return the plain model (peft's wrapper gone).

    A QuantLinear base: W' = dequantize(W) + scaling * B @ A, quantized again to `qtype` (None:
    the layer's own qtype and block size); `options` go to `ferroquant.quantize`. A float
    nn.Linear base: peft's own merge. The float W' exists for one layer at a time.
    With `qtype` given, the QuantLinear layers without adapters are re-quantized to it as well,
    so the model ends in one format (a GGUF export of an nf4 base needs a ggml qtype throughout).

    method="gptq" (needs `qtype`): every layer is merged to float (the whole model in float32
    for the call), then `ferroquant.quantize_model(., qtype, method="gptq", calibration=,
    tokenizer=, config=)` quantizes it layer by layer on the calibration data.
    """
    inner = model.get_base_model() if isinstance(model, _peft.PeftModel) else model
    if method != "rtn":
        if qtype is None:
            raise ValueError(f"merge_lora(method={method!r}) needs the qtype to quantize to")
        from ..models.quantize import quantize_model

        _merge_to_float(inner)
        return quantize_model(inner, qtype, progress=False, method=method,
                              calibration=calibration, tokenizer=tokenizer, config=config,
                              **options)  # fmt: skip
    for name, mod in list(inner.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        if isinstance(mod, QuantLoraLinear):
            lin = _float_linear(base.dequantized_weight() + mod.delta_weight(), base.bias)
            opts = dict(options)
            if qtype is None:
                if base.block_size != qtype_info(base.qtype).block_size:
                    opts.setdefault("block_size", base.block_size)
                if base.scale_mode:
                    opts.setdefault("scale_mode", base.scale_mode)
            new: nn.Module = QuantLinear.from_linear(lin, qtype or base.qtype, **opts)
        else:
            mod.merge()
            new = base
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, new)
    if qtype is not None:
        for name, mod in list(inner.named_modules()):
            if isinstance(mod, QuantLinear) and mod.qtype != qtype:
                lin = _float_linear(mod.dequantized_weight(), mod.bias)
                parent_name, _, child = name.rpartition(".")
                parent = inner.get_submodule(parent_name) if parent_name else inner
                setattr(parent, child, QuantLinear.from_linear(lin, qtype, **options))
    if hasattr(inner, "peft_config"):
        del inner.peft_config
    return inner


def _merge_to_float(inner: nn.Module) -> None:
    """Every LoRA layer -> nn.Linear(W + delta), every QuantLinear -> nn.Linear(dequantized)."""
    for name, mod in list(inner.named_modules()):
        if isinstance(mod, QuantLoraLinear):
            base = mod.get_base_layer()
            new: nn.Module = _float_linear(
                base.dequantized_weight() + mod.delta_weight(), base.bias
            )
        elif isinstance(mod, LoraLayer):
            mod.merge()
            new = mod.get_base_layer()
        elif isinstance(mod, QuantLinear) and not name.rsplit(".", 1)[-1].startswith("base_layer"):
            new = _float_linear(mod.dequantized_weight(), mod.bias)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, new)
    if hasattr(inner, "peft_config"):
        del inner.peft_config


def _float_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin
