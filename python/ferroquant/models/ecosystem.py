"""GPTQ and AWQ checkpoint folders (safetensors + config.json `quantization_config`), both ways.

- `save_checkpoint(model, out_dir, "gptq" | "awq")`: a transformers model whose quantized
  Linears are grouped-integer QuantLinears (`int{bits}_g{group}[_sym]`) -> a folder that
  transformers (through GPTQModel) and GPTQModel / AutoAWQ load: the packed tensors of
  `packed_int`, every other tensor in float16, `config.json` with the quantization_config.
- `load_checkpoint(path)`: such a folder, written by GPTQModel, AutoAWQ or us -> the transformers
  model with QuantLinear over the checkpoint's codes, zeros and scales (repacked once into
  ferroquant's layout; no requantizing: the dequantized weights equal the checkpoint's).
- `load_checkpoint` also reads llm-compressor's compressed-tensors folders (`pack-quantized`
  int weights, group or channel: see `compressed`), the same way.
- `convert_to_checkpoint(hf_dir, out_dir, ...)`: `ferroquant convert --format gptq|awq`.

Every file is written atomically; a refused input (act-order g_idx, an unknown quant_method or
checkpoint_format, a group that does not divide a row) is a clear error before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_path
from .._native import FormatError
from ..nn import QuantLinear
from ..qtypes import float_zero_refusal, gint_name, gint_params, is_float_zero
from ..tensor import QuantizeError
from . import compressed, packed_int

FORMATS = ("gptq", "awq")
# tokenizer and generation files copied beside the weights
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")  # fmt: skip


def quantization_config(fmt: str, bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a checkpoint we write."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits,
                "group_size": group_size, "desc_act": False, "sym": sym,
                "true_sequential": True, "static_groups": False, "lm_head": False,
                "pack_dtype": "int32", "damp_percent": 0.01,
                "meta": {"quantizer": ["ferroquant"]}}  # fmt: skip
    if fmt == "awq":
        return {"quant_method": "awq", "version": "gemm", "bits": bits, "group_size": group_size,
                "zero_point": True, "modules_to_not_convert": None}  # fmt: skip
    raise QuantizeError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, fmt: str,
                    side_files_from: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """Write `model` (transformers, grouped-integer QuantLinears) as a `fmt` checkpoint folder."""
    from safetensors.numpy import save_file

    fmt = fmt.lower()
    quantization_config(fmt, 4, 128, True)  # an unknown format fails first
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise QuantizeError("the model has no quantized Linear to write")
    kinds = {m.qtype for m in quant.values()}
    for kind in sorted(kinds):
        if is_float_zero(kind):
            raise QuantizeError(float_zero_refusal(kind, f"a {fmt} checkpoint"))
    if len(kinds) != 1 or gint_params(next(iter(kinds))) is None:
        raise QuantizeError(
            f"a {fmt} checkpoint holds one grouped integer qtype (int*_g*) for every quantized "
            f"Linear; the model has {', '.join(sorted(kinds))}"
        )
    gi = gint_params(next(iter(kinds)))
    assert gi is not None
    if fmt == "awq" and (gi.bits != 4 or gi.sym):
        raise QuantizeError(f"AWQ's GEMM format is 4-bit asymmetric, not {next(iter(kinds))}")
    tensors: dict[str, np.ndarray] = {}
    for name, mod in quant.items():
        packed = packed_int.to_gptq(mod.qtensor()) if fmt == "gptq" else packed_int.to_awq(
            mod.qtensor())  # fmt: skip
        for k, v in packed.items():
            tensors[f"{name}.{k}"] = np.ascontiguousarray(v)
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().cpu().to(torch.float16).numpy()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant or key.endswith("._extra_state") or not isinstance(value, torch.Tensor):
            continue
        tensors[key] = value.detach().cpu().to(torch.float16).contiguous().numpy()
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied: transformers restores it from the embedding
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(fmt, gi.bits, gi.group or -1, gi.sym)
    cfg["torch_dtype"] = cfg["dtype"] = "float16"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, default=str))
    if side_files_from is not None:
        for f in _SIDE_FILES:
            src = Path(side_files_from) / f
            if src.is_file():
                with atomic_path(out / f) as tmp:
                    shutil.copyfile(src, tmp)
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FormatError(f"{path}: no .safetensors file")
    out: dict[str, torch.Tensor] = {}
    for s in shards:
        out.update(load_file(str(s)))
    return out


def _scheme(qc: dict[str, Any], path: Path) -> tuple[str, int, int, bool | None, int]:
    """(format, bits, group_size, sym, zero offset) of a quantization_config."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise FormatError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported "
                              "(gptq, gptq_v2)")  # fmt: skip
        bits, group = int(qc["bits"]), int(qc.get("group_size", -1))
        return "gptq", bits, group, qc.get("sym"), 1 if fmt == "gptq" else 0
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise FormatError(f"{path}: AWQ version {version!r} is not supported (gemm)")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        return "awq", bits, int(qc.get("group_size", qc.get("q_group_size", 128))), False, 0
    raise FormatError(
        f"{path}: quantization_config.quant_method {method!r} is not supported (gptq, awq)"
    )


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A GPTQ / AWQ / compressed-tensors checkpoint folder as a transformers model with
    QuantLinear layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{path}: no config.json")
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not isinstance(qc, dict):
        raise FormatError(f"{cfg_file}: no quantization_config")
    is_ct = str(qc.get("quant_method", "")).lower() == compressed.METHOD
    if is_ct:
        schemes, ignore = compressed.read_schemes(qc, path)  # refusals before any tensor read
    else:
        fmt, bits, group, sym, offset = _scheme(qc, path)
    tensors = _read_tensors(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is a plain float model
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if is_ct:
        decoded = _decode_compressed(model, tensors, schemes, ignore, path)
        info: dict[str, Any] = {"format": compressed.METHOD, "schemes": [vars(s) for s in schemes]}
    else:
        decoded = _decode_gptq_awq(tensors, fmt, bits, group, sym, offset, path)
        info = {"format": fmt, "bits": bits, "group_size": group}
    for name, qt in decoded.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{path}: {name} is not a module of {type(model).__name__}") from None
        if not isinstance(old, nn.Linear) or tuple(old.weight.shape) != qt.shape:
            raise FormatError(f"{path}: {name} holds {qt.shape[0]}x{qt.shape[1]} weights; the "
                              f"model's module is {old}")  # fmt: skip
        bias = tensors.pop(f"{name}.bias", None)
        new = QuantLinear.from_qtensor(qt, bias.float() if bias is not None else None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    done = set(decoded)  # the QuantLinears hold their own buffers already
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in done
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]  # fmt: skip
    if missing or result.unexpected_keys:
        raise FormatError(f"{path}: tensors missing {missing[:5]}, unexpected "
                          f"{result.unexpected_keys[:5]}")  # fmt: skip
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.ferroquant_checkpoint = info
    return model.eval()


def _decode_gptq_awq(tensors: dict[str, torch.Tensor], fmt: str, bits: int, group: int,
                     sym: bool | None, offset: int, path: Path) -> dict[str, Any]:  # fmt: skip
    """{module name: gint QTensor} of a GPTQ / AWQ folder's packed modules (their tensors are
    taken out of `tensors`)."""
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise FormatError(f"{path}: no *.qweight tensor")
    out = {}
    for name in prefixes:
        t = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")
             if f"{name}.{k}" in tensors}  # fmt: skip
        missing = {"qweight", "qzeros", "scales"} - set(t)
        if missing:
            raise FormatError(f"{path}: {name} lacks {', '.join(sorted(missing))}")
        if fmt == "gptq" and offset == 0:  # gptq_v2 stores the zeros themselves
            t["qzeros"] = _v2_to_v1(t["qzeros"], bits)
        out[name] = (packed_int.from_gptq(t, bits, group, sym, name) if fmt == "gptq"
                     else packed_int.from_awq(t, bits, group, name))  # fmt: skip
    return out


def _decode_compressed(model: nn.Module, tensors: dict[str, torch.Tensor], schemes: list[Any],
                       ignore: tuple[str, ...], path: Path) -> dict[str, Any]:  # fmt: skip
    """{module name: gint QTensor} of a compressed-tensors folder's packed Linears."""
    packed = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    if not packed:
        raise FormatError(f"{path}: no *.weight_packed tensor")
    out = {}
    for name in packed:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{path}: {name} is not a module of {type(model).__name__}") from None
        s = compressed.scheme_for(name, mod, schemes, ignore)
        if s is None:
            raise FormatError(f"{path}: {name} is packed but no config group targets it")
        t = {k: tensors.pop(f"{name}.{k}") for k in compressed.SUFFIXES if f"{name}.{k}" in tensors}
        if "weight_g_idx" in t:
            raise FormatError(f"{path}: {name} has weight_g_idx (act-order groups); ferroquant's "
                              "grouped integers keep groups contiguous")  # fmt: skip
        missing = {"weight_packed", "weight_scale", "weight_shape"} - set(t)
        if missing:
            raise FormatError(f"{path}: {name} lacks {', '.join(sorted(missing))}")
        out[name] = compressed.decode_module(t, s, f"{path}: {name}")
    return out


def _v2_to_v1(qzeros: torch.Tensor, bits: int) -> np.ndarray:
    """gptq_v2 keeps the zeros themselves: store them minus one, as v1 does."""
    z = packed_int._stream_unpack(packed_int._np(qzeros), bits, qzeros.shape[1] * 32 // bits, 1)
    return packed_int._stream_pack((z - 1) & ((1 << bits) - 1), bits, 1, np.int32)


def convert_to_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
                          bits: int = 4, group_size: int = 128, sym: bool | None = None,
                          method: str = "rtn", calibration: Any = None, config: Any = None,
                          progress: bool = True) -> Path:  # fmt: skip
    """Quantize a Hugging Face float checkpoint (rtn or gptq) and write it as a `fmt` folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quantize import quantize_model

    fmt = fmt.lower()
    if sym is None:
        sym = fmt == "gptq"  # the peers' defaults: GPTQ symmetric, AWQ with zero points
    quantization_config(fmt, bits, group_size, sym)
    qtype = gint_name(bits, group_size, sym)
    hf_dir = Path(hf_dir)
    cols = json.loads((hf_dir / "config.json").read_text()).get("hidden_size")
    if cols and group_size not in (0, -1) and int(cols) % group_size:
        raise QuantizeError(
            f"group size {group_size} does not divide the rows of {cols} (hidden_size of "
            f"{hf_dir}); use a divisor such as 32 or 64"
        )
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir)) if method.lower() != "rtn" else None
    quantize_model(model, qtype, method=method, calibration=calibration, tokenizer=tok,
                   config=config, progress=progress)  # fmt: skip
    return save_checkpoint(model, out_dir, fmt, side_files_from=hf_dir)
