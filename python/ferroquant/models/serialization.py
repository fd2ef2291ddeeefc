"""Saving and loading quantized models.

ferroquant's safetensors layout: the model's state dict as tensors (QuantLinear keeps `qweight`
uint8 and `qstats` float32 buffers), plus two metadata entries:
  "format": "ferroquant"
  "ferroquant.modules": JSON {module name: {"qtype", "block_size", "scale_mode",
                                            "in_features", "out_features"}}
`load_quantized(model, path)` rebuilds those modules as QuantLinear on a model skeleton (e.g. the
unquantized architecture) and loads every tensor.

bitsandbytes checkpoints saved by transformers (`<name>.weight` packed uint8, `.absmax`,
`.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4` JSON) load
with `load_bnb_4bit(model, state_dict)`: the packed bytes are used as they are (the layouts are
the same); only the double-quantized absmax is expanded to float32, as bitsandbytes does.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_path
from ..nn import QuantLinear
from ..tensor import QTensor, QuantizeError

_EXTRA = "._extra_state"


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s state (quantized modules included) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    modules = {
        n: m.get_extra_state() for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    tensors = {
        k: v.detach().to("cpu").clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith(_EXTRA) and isinstance(v, torch.Tensor)
    }
    meta = {"format": "ferroquant", "ferroquant.modules": json.dumps(modules)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def load_quantized(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a file written by `save_quantized` into `model` (its architecture), in place."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "ferroquant" or "ferroquant.modules" not in meta:
            raise QuantizeError(f"{path}: not a ferroquant checkpoint (metadata 'format')")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = json.loads(meta["ferroquant.modules"])
    for name, st in modules.items():
        q = QuantLinear(
            st["in_features"],
            st["out_features"],
            bias=f"{name}.bias" in tensors,
            qtype=st["qtype"],
            block_size=st["block_size"],
            scale_mode=st["scale_mode"],
        )
        _replace(model, name, q)
        tensors[name + _EXTRA] = st
    model.load_state_dict(tensors, strict=strict)
    return model


def _bnb_absmax(sd: dict[str, torch.Tensor], prefix: str, state: dict[str, Any]) -> np.ndarray:
    absmax = sd[prefix + "absmax"]
    if "nested_blocksize" not in state:
        return absmax.float().numpy()
    code = sd[prefix + "nested_quant_map"].float().numpy()
    absmax2 = sd[prefix + "nested_absmax"].float().numpy()
    q = absmax.numpy().astype(np.int64)
    block = np.arange(q.size) // int(state["nested_blocksize"])
    out = (code[q] * absmax2[block]).astype(np.float32) + np.float32(state["nested_offset"])
    return out.astype(np.float32)


def load_bnb_4bit(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Replace every Linear that `state_dict` holds as a bitsandbytes 4-bit weight by a
    QuantLinear using the packed bytes unchanged, and load the remaining tensors."""
    sd = dict(state_dict)
    markers = [k for k in sd if ".weight.quant_state.bitsandbytes__" in k]
    for key in markers:
        prefix = key.split("quant_state.")[0]  # "<name>.weight."
        name = prefix[: -len(".weight.")]
        state = json.loads(bytes(sd[key].tolist()))
        qtype = state["quant_type"]
        n, k = state["shape"]
        qt = QTensor(
            qtype,
            (n, k),
            sd[prefix[:-1]].numpy().reshape(-1),
            int(state["blocksize"]),
            _bnb_absmax(sd, prefix, state),
        )
        bias = sd.pop(f"{name}.bias", None)
        _replace(model, name, QuantLinear.from_qtensor(qt, bias))
        for suffix in (
            "",
            "absmax",
            "quant_map",
            "nested_absmax",
            "nested_quant_map",
            f"quant_state.bitsandbytes__{qtype}",
        ):
            sd.pop((prefix + suffix) if suffix else prefix[:-1], None)
    model.load_state_dict(sd, strict=False)
    return model
