"""A GGUF file as a quantized Hugging Face model, and back.

    model = load_gguf_model("smollm2.q4_k_m.gguf")     # transformers model, QuantLinear inside
    save_gguf_model(model, "out.gguf")                 # llama.cpp loads and runs it

`load_gguf_model` builds the transformers model of the file's architecture (config from the GGUF
metadata by transformers' own GGUF reader, as `gguf_to_hf` does) with every quantized linear
weight as a `QuantLinear` holding the file's bytes: no dequantize / requantize. The llama
architecture stores attn_q / attn_k rows permuted (`convert.permute`); un-permuting moves whole
rows of blocks, so the bytes stay the file's. A quantized `token_embd` becomes a `QuantEmbedding`
(rows dequantized on lookup, as llama.cpp's get_rows); a model without `output.weight` (tied
embeddings) gets an output head that is a QuantLinear over the same bytes (one buffer, shared),
which is what llama.cpp computes. f32/f16/bf16 tensors (norms, unquantized weights) load as
float parameters (float32 unless `dtype`).

`save_gguf_model` writes such a model, or any llama-family transformers model after
`quantize_model`, to a GGUF file: QuantLinear / QuantEmbedding bytes as they are (q/k rows
permuted back), float weights as `float_type` (default: their own dtype, so nothing is rounded),
norms and 1-D tensors f32, hyperparameters as `hf_to_gguf` writes them, and the tokenizer from
`tokenizer` (a GGUF file to copy `tokenizer.*` keys from, a Hugging Face tokenizer folder or
object); a model from `load_gguf_model` copies its source file's tokenizer by default. nf4, int8
and fp8 are not GGUF types: such a layer is an error (quantize it with a ggml qtype).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import gguf as fg
from ..nn import QuantLinear
from ..nn.embedding import QuantEmbedding
from ..qtypes import qtype_info
from ..tensor import QTensor
from ..tensor import dequantize as dequantize_qtensor
from .convert import (
    ARCHES,
    PERMUTED_ARCHES,
    _add_hparams,
    _extra_tensors,
    _file_type,
    _model_arch,
    _Writer,
    permute,
    unpermute,
)
from .recipes import recipe_for

FLOAT_TYPES = ("f32", "f16", "bf16")
_TORCH_FLOAT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _rows(data: np.ndarray, n: int) -> np.ndarray:
    """Raw bytes of an n-row quantized tensor as (n, bytes per row)."""
    return np.asarray(data, dtype=np.uint8).reshape(n, -1)


def _qk_heads(gname: str, n_head: int, n_head_kv: int) -> tuple[int, int] | None:
    if ".attn_q." in gname:
        return n_head, n_head
    if ".attn_k." in gname:
        return n_head, n_head_kv
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, leaf, nn.Parameter(value, requires_grad=False))


def config_from_gguf(f: fg.GGUFFile) -> Any:
    """The transformers config of an open llama-family GGUF file: transformers' own GGUF key
    table (`GGUF_TO_TRANSFORMERS_MAPPING`) applied as its `load_gguf_checkpoint` applies it, on
    ferroquant's metadata reader (transformers' reader parses every vocabulary entry first: 10 s
    for SmolLM2 here, against milliseconds)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    arch = str(f.metadata["general.architecture"])
    name = str(f.metadata.get("general.name", ""))
    updated = "mistral" if "llama" in arch and "mistral" in name else arch
    table = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    cfg: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in f.tensors}
    for key, value in f.metadata.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        renamed = table.get(prefix, {}).get(rest)
        if renamed is None or renamed == -1:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        cfg[renamed] = value
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in f.metadata:
        cfg["vocab_size"] = len(f.metadata["tokenizer.ggml.tokens"])
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def load_gguf_model(path: str | os.PathLike[str], *, dtype: Any = torch.float32) -> nn.Module:
    """The transformers model of a llama-family GGUF file, quantized weights kept as they are in
    the file (see the module docstring). `dtype`: the float parameters' dtype (norms,
    unquantized weights) and the activations'. The model is in eval mode; `model.ferroquant_gguf`
    is the source path."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with fg.open(path) as f:
        arch = str(f.metadata.get("general.architecture"))
        if arch not in set(ARCHES.values()):
            raise ValueError(f"{path}: architecture {arch!r} is not in the llama family")
        n_layer = int(f.metadata[f"{arch}.block_count"])
        n_head = int(f.metadata[f"{arch}.attention.head_count"])
        n_head_kv = int(f.metadata.get(f"{arch}.attention.head_count_kv", n_head))
        tensors = {n: t for n, t in f.tensors.items() if n != "rope_freqs.weight"}
        config = config_from_gguf(f)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tmap = gguf.get_tensor_name_map(_model_arch(arch), n_layer)
        hf_of: dict[str, str] = {}
        for hf_name, _ in model.named_parameters():
            g = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if g is not None:
                hf_of.setdefault(g, hf_name)
        missing = [n for n in tensors if n not in hf_of]
        if missing:
            raise ValueError(f"{path}: no Hugging Face name for tensors {missing[:5]}")
        permuted = arch in PERMUTED_ARCHES
        for gname, t in tensors.items():
            _load_tensor(model, hf_of[gname], t, permuted and _qk_heads(gname, n_head, n_head_kv),
                         dtype)  # fmt: skip
    if config.tie_word_embeddings:
        _tie_head(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{path}: the file holds no tensor for {left[:5]}")
    model.eval()
    model.ferroquant_gguf = str(path)
    return model


def _load_tensor(
    model: nn.Module, hf_name: str, t: fg.GGUFTensor, heads: Any, dtype: torch.dtype
) -> None:
    mod_name, _, leaf = hf_name.rpartition(".")
    mod = model.get_submodule(mod_name)
    quantized = t.qtype not in FLOAT_TYPES and leaf == "weight" and len(t.shape) == 2
    if quantized and isinstance(mod, (nn.Linear, nn.Embedding)):
        data = _rows(t.data, t.shape[0])
        if heads:
            data = unpermute(data, *heads)
        info = qtype_info(t.qtype)
        qt = QTensor(info.name, t.shape, np.ascontiguousarray(data).reshape(-1), info.block_size)
        if isinstance(mod, nn.Embedding):
            new: nn.Module = QuantEmbedding.from_qtensor(qt)
        else:
            new = QuantLinear.from_qtensor(qt)
            new.bias = mod.bias  # None, loaded already, or still meta (loaded later)
        new.to(dtype if isinstance(mod, nn.Embedding) else torch.float32)
        _replace(model, mod_name, new)
        return
    x = t.dequantize()
    if heads:
        x = unpermute(x, *heads)
    value = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    target = model.get_submodule(mod_name)
    if isinstance(target, QuantLinear) and leaf == "bias":
        target.bias = nn.Parameter(value.to(torch.float32), requires_grad=False)
    else:
        _set_param(model, hf_name, value)


def _tie_head(model: nn.Module) -> None:
    """The output head of a tied model: the embedding's table (a QuantLinear over the same
    buffer when the table is quantized)."""
    emb = model.get_input_embeddings()
    head_name = next(
        (n for n, m in model.named_modules() if m is model.get_output_embeddings()), None
    )
    if head_name is None:
        return
    if isinstance(emb, QuantEmbedding):
        info = qtype_info(emb.qtype)
        head = QuantLinear(emb.embedding_dim, emb.num_embeddings, bias=False, qtype=emb.qtype,
                           block_size=info.block_size)  # fmt: skip
        head.qweight = emb.qweight  # the same tensor: one copy of the bytes
        _replace(model, head_name, head)
    else:
        model.get_submodule(head_name).weight = emb.weight


# -- saving ----------------------------------------------------------------------------------------


def _float_payload(x: torch.Tensor, float_type: str | None, gname: str) -> tuple[Any, str]:
    """(value to write, ggml type) of a float tensor."""
    arr = x.detach().to("cpu")
    one_d = arr.dim() < 2 or gname.endswith("_norm.weight")
    t = "f32" if one_d else (float_type or _TORCH_FLOAT.get(arr.dtype, "f32"))
    a32 = arr.to(torch.float32).numpy()
    if t == "f32":
        return a32, t
    from ..tensor import quantize

    return quantize(np.ascontiguousarray(a32), t), t


def _tokenizer_keys(source: Any) -> tuple[str, Any] | None:
    """("gguf", path) or ("dir", folder) of the tokenizer source; None when there is none."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix.lower() == ".gguf" and p.is_file():
            return "gguf", p
        if p.is_dir():
            return "dir", p
        raise ValueError(f"tokenizer {p}: not a .gguf file or a tokenizer folder")
    if hasattr(source, "save_pretrained"):
        return "object", source
    raise ValueError(
        f"tokenizer must be a GGUF path, a folder or a Hugging Face tokenizer: {source!r}"
    )


def save_gguf_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    float_type: str | None = None,
    name: str | None = None,
    tokenizer_pre: str | None = None,
) -> dict[str, str]:
    """Write a llama-family transformers model (QuantLinear / QuantEmbedding / float layers) to a
    GGUF file llama.cpp runs. Returns {GGUF tensor name: type}. The write is atomic."""
    import gguf

    from .hf_vocab import add_vocab

    cfg = model.config.to_dict()
    hf_arch = (cfg.get("architectures") or [type(model).__name__])[0]
    if hf_arch not in ARCHES:
        raise ValueError(f"architecture {hf_arch} is not supported; known: {sorted(ARCHES)}")
    arch = ARCHES[hf_arch]
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    if float_type is not None and float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {FLOAT_TYPES}, got {float_type!r}")
    tok = _tokenizer_keys(
        tokenizer if tokenizer is not None else getattr(model, "ferroquant_gguf", None)
    )
    if tok is None:
        raise ValueError("save_gguf_model needs the tokenizer: pass tokenizer= (a GGUF file, a "
                         "tokenizer folder or a Hugging Face tokenizer)")  # fmt: skip
    tmap = gguf.get_tensor_name_map(_model_arch(arch), n_layer)

    # (gguf name, payload, type) in the model's order; a tensor seen twice (tied) is written once
    entries: list[tuple[str, Any, str]] = []
    seen: set[int] = set()
    qtypes: Counter[str] = Counter()

    def gname_of(hf_name: str) -> str:
        g = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ValueError(f"cannot map {hf_name!r} to a GGUF tensor name")
        return g

    for mname, mod in model.named_modules():
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        key = mod.qweight.data_ptr()
        if key in seen:
            continue  # tied: the output head over the embedding's bytes
        seen.add(key)
        qt = mod.qtensor()
        info = qtype_info(qt.qtype)
        if info.ggml_id is None:
            raise ValueError(
                f"{mname} is {qt.qtype}, which GGUF files cannot hold; quantize it with a ggml "
                "qtype (q4_k, q8_0, ...)"
            )
        g = gname_of(mname + ".weight")
        data = _rows(qt.data, qt.shape[0])
        heads = _qk_heads(g, n_head, n_head_kv) if arch in PERMUTED_ARCHES else None
        if heads:
            data = permute(data, *heads)
        payload = QTensor(info.name, qt.shape, np.ascontiguousarray(data).reshape(-1),
                          info.block_size)  # fmt: skip
        entries.append((g, payload, info.name))
        qtypes[info.name] += 1
    for pname, p in model.named_parameters(remove_duplicate=False):
        if pname.endswith(".rotary_emb.inv_freq"):
            continue
        if id(p) in seen or p.data_ptr() in seen:
            continue
        seen.add(id(p))
        seen.add(p.data_ptr())
        g = gname_of(pname)
        x = p.detach().to("cpu", torch.float32)
        heads = _qk_heads(g, n_head, n_head_kv) if arch in PERMUTED_ARCHES else None
        if heads:
            x = torch.from_numpy(np.ascontiguousarray(permute(x.numpy(), *heads)))
        payload, t = _float_payload(x.to(p.dtype), float_type, g)
        entries.append((g, payload, t))
    tied = not any(g == "output.weight" for g, _, _ in entries)
    cfg["tie_word_embeddings"] = tied
    extra = _extra_tensors(cfg)
    ftype = qtypes.most_common(1)[0][0] if qtypes else "f32"
    try:
        file_type = _file_type(recipe_for(ftype))
    except ValueError:
        file_type = int(gguf.LlamaFileType.GUESSED)
    with _Writer(Path(path), arch) as w:
        _add_hparams(w, cfg, name or Path(cfg.get("_name_or_path") or "ferroquant").name, arch)
        w.add_file_type(file_type)
        _add_tokenizer(w, tok, cfg, tokenizer_pre, add_vocab)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for g, x in extra.items():
            w.add_tensor_info(g, x.shape, "f32")
        for g, payload, t in entries:
            w.add_tensor_info(g, payload.shape, t)
        for x in extra.values():
            w.write_tensor_data(x)
        for _, payload, _ in entries:
            w.write_tensor_data(payload)
    return {**{g: "f32" for g in extra}, **{g: t for g, _, t in entries}}


def _add_tokenizer(w: Any, tok: tuple[str, Any], cfg: dict[str, Any], pre: str | None,
                   add_vocab: Any) -> None:  # fmt: skip
    kind, src = tok
    if kind == "gguf":
        with fg.open(src) as f:
            for key, val in f.metadata.items():
                if key.startswith("tokenizer."):
                    w.add_key_value(key, val, f.metadata_types[key])
        return
    if kind == "dir":
        add_vocab(w, Path(src), cfg.get("vocab_size"), pre)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src.save_pretrained(tmp)
        add_vocab(w, Path(tmp), cfg.get("vocab_size"), pre)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QuantLinear / QuantEmbedding by an nn.Linear / nn.Embedding holding the
    dequantized weights (in `dtype`), in place: the "dequantize, then run" twin of a quantized
    model. Modules that shared one buffer (a tied head) share one weight again."""
    shared: dict[int, nn.Parameter] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        key = mod.qweight.data_ptr()
        if key not in shared:
            w = mod.dequantized_weight() if isinstance(mod, QuantLinear) else None
            if w is None:
                w = torch.from_numpy(dequantize_qtensor(mod.qtensor()))
            shared[key] = nn.Parameter(w.to(dtype), requires_grad=False)
        weight = shared[key]
        if isinstance(mod, QuantEmbedding):
            new: nn.Module = nn.Embedding(mod.num_embeddings, mod.embedding_dim, _weight=weight)
        else:
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device="meta")  # fmt: skip
            new.weight = weight
            if mod.bias is not None:
                new.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        _replace(model, name, new)
    return model
