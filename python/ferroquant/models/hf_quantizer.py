"""ferroquant as a transformers quantization backend (`quant_method: "ferroquant"`).

    from ferroquant import FerroquantConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FerroquantConfig(
        qtype="q4_k_m", method="gptq"))          # quantized on load, Linears -> QuantLinear
    model.save_pretrained(out)                    # packed tensors + quantization_config
    AutoModelForCausalLM.from_pretrained(out)     # the same QuantLinears, bit for bit

Quantize on load: transformers loads the float weights as usual; afterwards `quantize_model`
runs with the config's recipe, method and calibration (text tokenized by the checkpoint's own
tokenizer). The quantized modules are then recorded in the config (`modules`: name -> qtype,
block size, scale mode and the sizes of the `qweight` / `qstats` buffers), so that a saved
folder describes its own layout: on reload the Linears named there are replaced by QuantLinear
skeletons of exactly those shapes before the loader fills them, and nothing is requantized.

The classes register with transformers when this module is imported: `ferroquant.FerroquantConfig`
imports it (a fresh process reloading a saved folder touches `ferroquant.FerroquantConfig`, or
imports this module, before `from_pretrained`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..cuda.checks import expected_sizes
from ..nn import QuantLinear
from ..tensor import QuantizeError

QUANT_METHOD = "ferroquant"
CALIBRATED = ("gptq", "awq", "awq+gptq")


class FerroquantConfig(QuantizationConfigMixin):
    """What `from_pretrained(..., quantization_config=FerroquantConfig(...))` quantizes to.

    qtype: a recipe ("q4_k_m", "q4_k_s", ...) or a qtype name ("q4_0", "nf4", "int4_g64", ...).
    method: "rtn" (default, no data), "gptq", "awq", "awq+gptq" or "hqq" (see docs/methods.md).
    calibration: the calibration text file of the calibrated methods (None: gensim's
      lee_background.cor), tokenized by the checkpoint's tokenizer.
    n_samples, seq_len: calibration windows (None: the method's default, 128 x 512).
    method_options: the method's other options (GPTQConfig / AWQConfig / HQQConfig fields).
    skip: module names (or suffixes) kept in float (default: lm_head).
    modules: filled in by the quantizer ({module name: layout}); a saved folder's own record.
    Every field is checked here: an unknown qtype, method or option is a QuantizeError.
    """

    def __init__(
        self,
        qtype: str = "q4_k_m",
        method: str = "rtn",
        calibration: str | None = None,
        n_samples: int | None = None,
        seq_len: int | None = None,
        method_options: dict[str, Any] | None = None,
        skip: list[str] | tuple[str, ...] = ("lm_head",),
        modules: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)  # from a saved config.json
        if kwargs:
            raise QuantizeError(
                f"FerroquantConfig: unknown field(s) {', '.join(sorted(kwargs))}; fields: qtype, "
                "method, calibration, n_samples, seq_len, method_options, skip, modules"
            )
        self.quant_method = QUANT_METHOD
        self.qtype = str(qtype)
        self.method = str(method).lower()
        self.calibration = None if calibration is None else str(calibration)
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.method_options = dict(method_options or {})
        self.skip = list(skip)
        self.modules = dict(modules or {})
        self.post_init()

    def post_init(self) -> None:
        """Every field checked before any weight loads (so nothing is half-built on an error)."""
        from .recipes import recipe_for

        recipe_for(self.qtype)  # QuantizeError naming the known recipes and qtypes
        self.method_config()
        if self.calibration is not None and self.method not in CALIBRATED:
            raise QuantizeError(
                f"FerroquantConfig: calibration is for {', '.join(CALIBRATED)}, "
                f"not method {self.method!r}"
            )
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise QuantizeError(f"FerroquantConfig: calibration file {self.calibration} not found")
        from ..qtypes import qtype_info

        for name, layout in self.modules.items():
            if "qtype" in layout:
                qtype_info(layout["qtype"])  # QuantizeError naming an unknown qtype
            missing = {"qtype", "block_size", "qweight", "qstats"} - set(layout)
            if missing:
                raise QuantizeError(
                    f"FerroquantConfig.modules[{name!r}] lacks {', '.join(sorted(missing))}"
                )

    def method_config(self) -> Any:
        """The method's dataclass config (QuantizeError for an unknown method or option)."""
        from ..methods import method_config

        over = {k: v for k, v in (("n_samples", self.n_samples), ("seq_len", self.seq_len))
                if v is not None}  # fmt: skip
        if over and self.method not in CALIBRATED:
            raise QuantizeError(
                f"FerroquantConfig: n_samples / seq_len are for {', '.join(CALIBRATED)}, "
                f"not method {self.method!r}"
            )
        return method_config(self.method, dict(self.method_options), **over)


def module_layout(mod: QuantLinear) -> dict[str, Any]:
    """The record a saved folder keeps of one QuantLinear (enough to rebuild its buffers)."""
    return {
        "qtype": mod.qtype,
        "block_size": int(mod.block_size),
        "scale_mode": mod.scale_mode,
        "qweight": int(mod.qweight.numel()),
        "qstats": int(mod.qstats.numel()),
    }


class _LoadingQuantLinear(QuantLinear):
    """A QuantLinear skeleton while transformers loads a saved folder: without the extra state,
    which the loader would otherwise count as a missing tensor (the folder's config holds the
    format instead). It becomes a plain QuantLinear once the weights are in."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class FerroquantHfQuantizer(HfQuantizer):
    """transformers' side of FerroquantConfig: quantize after loading, or rebuild on reload."""

    requires_calibration = False

    def __init__(self, quantization_config: FerroquantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and not quantization_config.modules:
            raise QuantizeError(
                "a ferroquant checkpoint's quantization_config names no quantized module "
                "(config.json quantization_config.modules is empty)"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            _check_groups(model, self.quantization_config)
            return model
        for name, layout in self.quantization_config.modules.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise QuantizeError(
                    f"quantization_config.modules names {name}, which "
                    f"{type(model).__name__} does not have"
                ) from None
            if not isinstance(old, nn.Linear):
                raise QuantizeError(f"quantization_config.modules: {name} is not an nn.Linear")
            n, k = old.out_features, old.in_features
            mode = layout.get("scale_mode") or ""
            want = expected_sizes(layout["qtype"], n, k, int(layout["block_size"]), mode)
            if want != (int(layout["qweight"]), int(layout["qstats"])):
                raise QuantizeError(
                    f"quantization_config.modules[{name!r}]: {layout['qweight']} bytes and "
                    f"{layout['qstats']} statistics, but {layout['qtype']} of {n}x{k} holds "
                    f"{want[0]} and {want[1]}"
                )
            new = _LoadingQuantLinear(
                old.in_features, old.out_features, bias=old.bias is not None,
                qtype=layout["qtype"], block_size=int(layout["block_size"]),
                scale_mode=layout.get("scale_mode"), device="meta",
            )  # fmt: skip
            # buffers of the saved sizes, so that the loader's shape checks pass; the loader
            # keeps a skeleton's dtype (float32 statistics whatever dtype= the model loads in)
            new.qweight = torch.empty(int(layout["qweight"]), dtype=torch.uint8, device="meta")
            new.qstats = torch.empty(int(layout["qstats"]), dtype=torch.float32, device="meta")
            _set(model, name, new)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        if self.pre_quantized:
            for mod in model.modules():
                if isinstance(mod, QuantLinear):
                    if mod.qstats.dtype != torch.float32:  # a dtype= cast must not round stats
                        raise QuantizeError(
                            "ferroquant statistics were loaded as "
                            f"{mod.qstats.dtype}; they must stay float32"
                        )
                    mod.__class__ = QuantLinear  # loading done: the extra state is back
                    mod._np_cache = None
                    mod.use_kernel_layout(mod.qweight.device.type == "cuda")
            return model
        from .quantize import quantize_model

        tokenizer = None
        if cfg.method in CALIBRATED:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
        calibration = Path(cfg.calibration) if cfg.calibration is not None else None
        quantize_model(
            model, cfg.qtype, skip=tuple(cfg.skip), method=cfg.method, calibration=calibration,
            tokenizer=tokenizer, config=cfg.method_config(), progress=False,
        )  # fmt: skip
        cfg.modules = {
            n: module_layout(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)
        }
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Any], dict]:
        # QuantLinear's format description travels in the config (modules), not as extra state
        sd = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
        return sd, {}

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_groups(model: nn.Module, cfg: FerroquantConfig) -> None:
    """A grouped integer qtype must fit every Linear it is asked for: a group that does not
    divide a row is an error before any weight loads (a mix's per-tensor fallbacks are not)."""
    from ..qtypes import gint_params
    from .recipes import recipe_for

    gi = gint_params(cfg.qtype.lower())
    if gi is None or not gi.group:
        return
    rule = recipe_for(cfg.qtype, tuple(cfg.skip))
    for name, lin in model.named_modules():
        if not isinstance(lin, nn.Linear) or rule.qtype_for(name, (1, 1), 1) is None:
            continue
        if lin.in_features % gi.group:
            raise QuantizeError(
                f"{cfg.qtype}: group size {gi.group} does not divide the rows of {name} "
                f"({lin.in_features} columns); use a group that divides every row (e.g. 32) "
                f"or add {name.rpartition('.')[2]} to skip"
            )


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def register() -> None:
    """Register FerroquantConfig / FerroquantHfQuantizer under "ferroquant" (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FerroquantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FerroquantHfQuantizer)


register()
