"""Quantization methods: each writes tensors in an existing ferroquant format.

`rtn` (round to nearest, the default, no data), `gptq`, `awq` and `awq+gptq` (calibrated, layer
by layer) and `hqq` (half-quadratic zero-point search, no data). Every method states its defaults
in one dataclass config (`RTNConfig`, `GPTQConfig`, `AWQConfig`, `HQQConfig`; "awq+gptq" is an
AWQConfig with gptq=True)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..tensor import QuantizeError
from .awq import AWQConfig
from .gptq import GPTQConfig, gptq_quantize, layer_error
from .hqq import HQQConfig, hqq_quantize
from .rtn import RTNConfig

METHODS: dict[str, type] = {
    "rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig, "awq+gptq": AWQConfig,
    "hqq": HQQConfig,
}  # fmt: skip

__all__ = [
    "METHODS",
    "AWQConfig",
    "GPTQConfig",
    "HQQConfig",
    "RTNConfig",
    "gptq_quantize",
    "hqq_quantize",
    "layer_error",
    "method_config",
]


def method_config(method: str, config: Any = None, **overrides: Any) -> Any:
    """The config of `method` ("rtn", "gptq", "awq", "awq+gptq", "hqq"): `config` (an instance
    or a dict) with `overrides`; QuantizeError for an unknown method or option."""
    key = str(method).lower()
    if key not in METHODS:
        raise QuantizeError(f"unknown method {method!r}; methods: {' '.join(METHODS)}")
    cls = METHODS[key]
    if isinstance(config, cls):
        base = {f.name: getattr(config, f.name) for f in fields(cls)}
    elif config is None:
        base = {}
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise QuantizeError(f"config for {key} must be a {cls.__name__} or a dict, got {config!r}")
    base.update(overrides)
    if key.startswith("awq"):
        base["gptq"] = key == "awq+gptq"
    known = {f.name for f in fields(cls)}
    bad = sorted(set(base) - known)
    if bad:
        raise QuantizeError(f"unknown {key} option(s) {', '.join(bad)}; known: {' '.join(known)}")
    return cls(**base)
