"""Hugging Face checkpoints <-> GGUF for the llama family (Llama, Mistral, Qwen2, SmolLM).

    hf_to_gguf("SmolLM2-135M/", "smollm2.q4_k_m.gguf", "q4_k_m")
    gguf_to_hf("smollm2.q4_k_m.gguf", "smollm2-hf/")          # dequantized, for inspection
    quantize_gguf("in.gguf", "out.q8_0.gguf", "q8_0")         # requantize a GGUF file

`hf_to_gguf` does what llama.cpp's convert_hf_to_gguf.py + llama-quantize do, in one streaming
pass: tensor names and metadata keys from gguf-py (`get_tensor_name_map`, `gguf.Keys`, the
writer methods of `gguf.GGUFWriter`), the tokenizer as convert_hf_to_gguf.py writes it
(`hf_vocab`), llama.cpp's q/k row permutation for the llama architecture, and the tensor types
of `llama_tensor_get_type` (`recipes`). Safetensors shards are read one tensor at a time, all
tensor infos are declared first, then each tensor is converted, quantized and written, so peak
memory is about one tensor (float32) plus its quantized copy, never the model.

`gguf_to_hf` is the reverse, for inspection: config and tokenizer by transformers' GGUF loader
(AutoConfig / AutoTokenizer with gguf_file=), the tensors dequantized by ferroquant exactly as
they are in the file (q/k rows permuted back), written as one streaming model.safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import gguf as fg
from ..qtypes import IMATRIX_QTYPES
from ..tensor import QTensor, quantize
from .checkpoint import StoredTensor, check_checkpoint
from .recipes import Recipe, recipe_for

if TYPE_CHECKING:
    from ..methods.imatrix_io import ImportanceMatrix

ARCHES = {  # Hugging Face architectures -> llama.cpp architecture
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
PERMUTED_ARCHES = ("llama",)  # convert_hf_to_gguf.py's LlamaModel.permute
UNQUANTIZED = ("f32", "f16", "bf16")


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows -> ggml's
    interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The inverse of `permute` (transformers' LlamaTensorProcessor does the same)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class _Writer(fg.GGUFWriter):
    """ferroquant's streaming writer, with every other `add_*` of gguf-py's GGUFWriter (they
    only call add_key_value / add_uint32 / add_array ..., which this class has)."""

    def __getattr__(self, name: str) -> Any:
        import gguf

        fn = getattr(gguf.GGUFWriter, name, None) if name.startswith("add_") else None
        if fn is None:
            raise AttributeError(name)
        return types.MethodType(fn, self)


def _file_type(recipe: Recipe) -> int:
    import gguf

    names = {"f32": "ALL_F32", "q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M",
             "q5_k": "MOSTLY_Q5_K_M"}  # fmt: skip
    name = names.get(recipe.name, "MOSTLY_" + recipe.name.upper())
    try:
        return int(gguf.LlamaFileType[name])
    except KeyError:
        raise ValueError(f"{recipe.name} is not a type a GGUF file can hold") from None


def _model_arch(arch: str) -> Any:
    import gguf

    for k, v in gguf.MODEL_ARCH_NAMES.items():
        if v == arch:
            return k
    raise ValueError(f"unknown llama.cpp architecture {arch!r}")


# -- Hugging Face side ---------------------------------------------------------------------------


def _hf_tensors(hf_dir: Path) -> Iterator[tuple[str, Path]]:
    """(name, shard) of every tensor in the folder's safetensors shards, in shard order."""
    from safetensors import safe_open

    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{hf_dir}: no .safetensors files")
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, shard


def _hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no config.json")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHES:
        raise ValueError(f"{hf_dir}: architecture {arch} is not supported; known: {sorted(ARCHES)}")
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    return float(params["rope_theta"]) if "rope_theta" in params else None


def _add_hparams(w: _Writer, cfg: dict[str, Any], name: str, arch: str) -> None:
    """TextModel / LlamaModel.set_gguf_parameters of convert_hf_to_gguf.py."""
    n_head = cfg["num_attention_heads"]
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    if "max_position_embeddings" in cfg:
        w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    if (theta := _rope_theta(cfg)) is not None:
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim or cfg["hidden_size"] // n_head)
    scaling = _rope_scaling(cfg)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind not in ("default", "llama3") or (kind == "llama3" and arch != "llama"):
        raise ValueError(f"rope scaling {kind!r} is not supported by this converter")


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rope scaling parameters (config.json's rope_scaling, or transformers 5's
    rope_parameters)."""
    return cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}


def _extra_tensors(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """LlamaModel.generate_extra_tensors of convert_hf_to_gguf.py: rope_freqs for llama3 rope
    scaling, computed as there (torch float32)."""
    import math

    import torch

    rope = _rope_scaling(cfg)
    if rope.get("rope_type", rope.get("type", "")).lower() != "llama3":
        return {}
    base = _rope_theta(cfg) or 10000.0
    if (dim := cfg.get("head_dim")) is None:
        dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    if low_freq_wavelen == high_freq_wavelen:
        raise ValueError("llama3 rope scaling with low_freq_factor == high_freq_factor")
    factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32).numpy()}


@dataclass
class HFPlan:
    """What `hf_to_gguf` will write, decided before anything is written: the config, the recipe
    and, in file order, one `TensorJob` per GGUF tensor (generated tensors first, as in
    convert_hf_to_gguf.py)."""

    hf_dir: Path
    cfg: dict[str, Any]
    arch: str
    recipe: Recipe
    n_head: int
    n_head_kv: int
    tensors: list[TensorJob]
    extra: dict[str, np.ndarray]  # generated tensors (rope_freqs), by GGUF name
    headers: dict[Path, dict[str, StoredTensor]]  # every shard's checked safetensors header

    @property
    def chosen(self) -> dict[str, str]:
        return {t.gname: t.qtype for t in self.tensors}


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: its name, where it comes from (None for a generated one), its numpy
    shape and the type it is written in."""

    gname: str
    hf_name: str | None
    shard: Path | None
    shape: tuple[int, ...]
    qtype: str


def plan_hf_to_gguf(hf_dir: str | os.PathLike[str], qtype: str | Recipe = "f16") -> HFPlan:
    """The tensors, names, shapes and types `hf_to_gguf` writes, from the folder's config.json
    and the safetensors headers (no tensor data is read)."""
    import gguf
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    cfg = _hf_config(hf_dir)
    headers = check_checkpoint(hf_dir)  # a missing, truncated or malformed shard fails here
    arch = ARCHES[cfg["architectures"][0]]
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads", n_head))
    recipe = qtype if isinstance(qtype, Recipe) else recipe_for(qtype, (), n_head // n_head_kv)
    _file_type(recipe)  # a recipe a GGUF file cannot hold fails here, before anything is read
    tmap = gguf.get_tensor_name_map(_model_arch(arch), n_layer)

    extra = _extra_tensors(cfg)
    plan = [TensorJob(g, None, None, x.shape, "f32") for g, x in extra.items()]
    hf_items = list(_hf_tensors(hf_dir))
    names = {n for n, _ in hf_items}
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in names
    for hf_name, shard in hf_items:
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"{hf_dir}: cannot map tensor {hf_name!r} to a GGUF name")
        with safe_open(shard, framework="pt") as f:
            shape = tuple(int(s) for s in f.get_slice(hf_name).get_shape())
        t = _gguf_type(recipe, gname, shape, n_layer, tied)
        plan.append(TensorJob(gname, hf_name, shard, shape, t))
    return HFPlan(hf_dir, cfg, arch, recipe, n_head, n_head_kv, plan, extra, headers)


def write_header(
    w: _Writer, plan: HFPlan, name: str | None = None, tokenizer_pre: str | None = None
) -> None:
    """Metadata (hyper-parameters, file type, tokenizer) and every tensor info of `plan`."""
    import gguf

    from .hf_vocab import add_vocab

    _add_hparams(w, plan.cfg, name or plan.hf_dir.resolve().name, plan.arch)
    w.add_file_type(_file_type(plan.recipe))
    add_vocab(w, plan.hf_dir, plan.cfg.get("vocab_size"), tokenizer_pre)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in plan.tensors:
        w.add_tensor_info(t.gname, t.shape, t.qtype)


def load_hf_tensor(shard: Path, hf_name: str, rows: tuple[int, int] | None = None) -> Any:
    """One tensor of a safetensors shard as torch holds it (its own dtype), or its rows
    [start, stop) only."""
    from safetensors import safe_open

    with safe_open(shard, framework="pt") as f:
        if rows is None:
            return f.get_tensor(hf_name)
        return f.get_slice(hf_name)[rows[0] : rows[1]]


def convert_tensor(
    plan: HFPlan, job: TensorJob, x: Any, importance: np.ndarray | None = None
) -> np.ndarray | QTensor:
    """One tensor as it goes into the file: `x` (a torch tensor from `load_hf_tensor`: the whole
    tensor or a range of whole rows, for q/k a range of whole heads) in float32, q/k rows
    permuted as llama.cpp does, quantized to the job's type (float32 stays an array) with the
    per-column `importance` (an imatrix's values) where the type's ggml quantizer takes one."""
    import torch

    x = x.to(torch.float32).numpy()
    heads = None
    if plan.arch in PERMUTED_ARCHES and job.gname.endswith(("attn_q.weight", "attn_q.bias")):
        heads = plan.n_head
    elif plan.arch in PERMUTED_ARCHES and job.gname.endswith(("attn_k.weight", "attn_k.bias")):
        heads = plan.n_head_kv
    if heads is not None:  # the heads these rows hold: all of them, or a range of whole heads
        if x.shape[0] * heads % job.shape[0]:
            raise ValueError(f"{job.gname}: rows {x.shape[0]} are not whole heads")
        x = permute(x, x.shape[0] * heads // job.shape[0], None)
    if job.qtype == "f32":
        return x
    w = importance if job.qtype in IMATRIX_QTYPES else None
    return quantize(np.ascontiguousarray(x), job.qtype, w)


def hf_to_gguf(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str | Recipe = "f16",
    *,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    progress: bool = False,
    tensors: dict[str, Any] | None = None,
    imatrix: ImportanceMatrix | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Convert a Hugging Face llama-family folder (config.json, *.safetensors, tokenizer files)
    to a GGUF file; `qtype` is f32 / f16 / bf16, a llama.cpp file type (q4_k_m, q8_0, ...) or a
    ggml qtype (pure). `tokenizer_pre` names llama.cpp's BPE pre-tokenizer (tokenizer.ggml.pre)
    where convert_hf_to_gguf.py's hash table does not know the tokenizer. Returns {gguf tensor
    name: qtype}. The write is atomic. `tensors` maps Hugging Face tensor names to QTensors
    already quantized (e.g. by GPTQ) in the type the recipe gives them: they are written as given
    (rows permuted as the floats would be) instead of being quantized here; a torch tensor
    there replaces the checkpoint's float tensor (converted as it would be). `imatrix`
    (llama.cpp's importance matrix, checked against the model's tensor names and columns before
    anything is written) weights the quantizers that take one, as llama-quantize --imatrix does;
    `metadata` adds keys, types inferred (e.g. an allocation plan's summary)."""
    plan = plan_hf_to_gguf(hf_dir, qtype)
    if imatrix is not None:
        check_imatrix_for(imatrix, {t.gname: t.shape for t in plan.tensors})
    with _Writer(Path(out_path), plan.arch) as w:
        write_header(w, plan, name, tokenizer_pre)
        for key, val in (metadata or {}).items():
            w.add_key_value(key, val, None)
        items: Any = plan.tensors
        if progress:
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm

                items = tqdm(plan.tensors, desc=f"convert {plan.recipe.name}", unit="tensor")
        for job in items:
            if job.hf_name is None or job.shard is None:
                w.write_tensor_data(plan.extra[job.gname])
                continue
            if tensors is not None and job.hf_name in tensors:
                given = tensors[job.hf_name]
                if isinstance(given, QTensor):
                    w.write_tensor_data(_given(plan, job, given))
                else:  # a float tensor changed by the method (AWQ's rescaled norms)
                    w.write_tensor_data(convert_tensor(plan, job, given))
                continue
            imp = imatrix.values(job.gname) if imatrix is not None else None
            x = convert_tensor(plan, job, load_hf_tensor(job.shard, job.hf_name), imp)
            w.write_tensor_data(x)
            del x
    return plan.chosen


def _given(plan: HFPlan, job: TensorJob, qt: QTensor) -> QTensor:
    """A precomputed QTensor for `job`, its rows permuted as llama.cpp wants q / k (rows of
    blocks, and per-row statistics, move as the float rows would)."""
    if qt.qtype != job.qtype:
        raise ValueError(
            f"{job.gname}: the given tensor is {qt.qtype}, the recipe wants {job.qtype}"
        )
    heads = None
    if plan.arch in PERMUTED_ARCHES and job.gname.endswith("attn_q.weight"):
        heads = plan.n_head
    elif plan.arch in PERMUTED_ARCHES and job.gname.endswith("attn_k.weight"):
        heads = plan.n_head_kv
    if heads is None:
        return qt
    rows = qt.shape[0]
    data = permute(np.asarray(qt.data).reshape(rows, -1), heads, None)
    stats = np.asarray(qt.stats)
    if stats.size:
        stats = permute(stats.reshape(rows, -1), heads, None)
    return QTensor(qt.qtype, qt.shape, np.ascontiguousarray(data).reshape(-1), qt.block_size,
                   np.ascontiguousarray(stats).reshape(-1), qt.scale_mode)  # fmt: skip


def check_imatrix_for(imatrix: ImportanceMatrix, shapes: dict[str, tuple[int, ...]]) -> None:
    """ValueError naming the tensor when `imatrix` does not fit the model's 2-D weights."""
    from ..methods.imatrix import check_imatrix

    cols = {n: int(s[-1]) for n, s in shapes.items() if len(s) >= 2}
    check_imatrix(imatrix, cols)


def _quantizable(gname: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the llama family: 2-D weights but norms."""
    return len(shape) >= 2 and gname.endswith(".weight") and not gname.endswith("_norm.weight")


def _gguf_type(recipe: Recipe, gname: str, shape: tuple[int, ...], n_layer: int, tied: bool) -> str:
    """The type of one tensor: 1-D tensors and norms f32 (as convert_hf_to_gguf.py and
    llama-quantize keep them), the rest per the recipe."""
    if not _quantizable(gname, shape):
        return "f32"
    if recipe.name in UNQUANTIZED:
        return recipe.name
    parts = gname.split(".")
    i_layer = int(parts[1]) if parts[0] == "blk" else 0
    return recipe.tensor_type(gname, shape, i_layer, n_layer, tied)


# -- GGUF -> Hugging Face --------------------------------------------------------------------------

_ST_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str,
                       tensors: Iterator[np.ndarray]) -> None:  # fmt: skip
    """A safetensors file written tensor by tensor: the header (names, shapes, offsets) first,
    then each array of `tensors` in `entries` order (the format: u64 header length, JSON header
    padded with spaces to 8 bytes, raw little-endian data)."""
    code, size = _ST_DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, shape), x in zip(entries, tensors, strict=True):
            if x.shape != tuple(shape):
                raise ValueError(f"{name}: got shape {x.shape}, declared {shape}")
            f.write(np.ascontiguousarray(x).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _hf_names(config: Any, arch: str, n_layer: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, from the parameters of the transformers
    model of `config` (built on the meta device: no memory) mapped by gguf-py's name map."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    tmap = gguf.get_tensor_name_map(_model_arch(arch), n_layer)
    out: dict[str, str] = {}
    for hf_name in model.state_dict():
        g = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            out.setdefault(g, hf_name)
    return out


def gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
) -> list[str]:
    """Write a llama-family GGUF file as a Hugging Face folder: config.json (and
    generation_config.json), model.safetensors (dequantized, `dtype` float32, bfloat16 or
    float16), tokenizer.json / tokenizer_config.json. Each file is replaced atomically. Returns
    the names of the files written."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_ST_DTYPES)}, got {dtype!r}")
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with fg.open(gguf_path) as f:
        arch = str(f.metadata.get("general.architecture"))
        if arch not in set(ARCHES.values()):
            raise ValueError(f"{gguf_path}: architecture {arch!r} is not in the llama family")
        n_layer = int(f.metadata[f"{arch}.block_count"])
        n_head = int(f.metadata[f"{arch}.attention.head_count"])
        n_head_kv = int(f.metadata.get(f"{arch}.attention.head_count_kv", n_head))
        tensors = [t for t in f.tensors.values() if t.name != "rope_freqs.weight"]
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in tensors)
    config.dtype = dtype
    names = _hf_names(config, arch, n_layer)
    missing = [t.name for t in tensors if t.name not in names]
    if missing:
        raise ValueError(f"{gguf_path}: no Hugging Face name for tensors {missing[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    def values() -> Iterator[np.ndarray]:
        with fg.open(gguf_path) as g:
            for t in tensors:
                x = g.tensors[t.name].dequantize()
                if arch in PERMUTED_ARCHES and ".attn_q." in t.name:
                    x = unpermute(x, n_head, n_head)
                elif arch in PERMUTED_ARCHES and ".attn_k." in t.name:
                    x = unpermute(x, n_head, n_head_kv)
                if dtype == "float32":
                    yield x
                elif dtype == "float16":
                    yield quantize(x, "f16").data.view(np.float16).reshape(x.shape)
                else:
                    yield quantize(x, "bf16").data.view(np.uint16).reshape(x.shape)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir))
    try:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        entries = [(names[t.name], t.shape) for t in tensors]
        _write_safetensors(tmp / "model.safetensors", entries, dtype, values())
        written = sorted(p.name for p in tmp.iterdir())
        for name in written:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


# -- GGUF -> GGUF ----------------------------------------------------------------------------------


def quantize_gguf(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str | Recipe,
    *,
    progress: bool = False,
    imatrix: ImportanceMatrix | None = None,
) -> dict[str, str]:
    """Requantize a GGUF file as llama-quantize does: every tensor dequantized to float32 and
    quantized per the recipe (`hf_to_gguf`'s rules), one tensor at a time; metadata copied with
    its value types, general.file_type and general.quantization_version set. Returns {tensor
    name: qtype}. `out_path` must differ from `in_path`. `imatrix` as in `hf_to_gguf`."""
    import gguf

    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise ValueError(f"{out_path}: the output must not be the input file")
    with fg.open(in_path) as f:
        arch = str(f.metadata.get("general.architecture", ""))
        n_layer = int(f.metadata.get(f"{arch}.block_count", 0))
        n_head = int(f.metadata.get(f"{arch}.attention.head_count", 1))
        n_head_kv = int(f.metadata.get(f"{arch}.attention.head_count_kv", n_head)) or n_head
        recipe = qtype if isinstance(qtype, Recipe) else recipe_for(qtype, (), n_head // n_head_kv)
        tied = "output.weight" not in f.tensors
        plan = {
            n: _gguf_type(recipe, n, t.shape, n_layer, tied)
            if _quantizable(n, t.shape)
            else t.qtype
            for n, t in f.tensors.items()
        }  # llama-quantize copies what it does not quantize
        if imatrix is not None:
            check_imatrix_for(imatrix, {n: t.shape for n, t in f.tensors.items()})
        alignment = f.alignment if "general.alignment" in f.metadata else None
        with _Writer(out_path, None, alignment=alignment) as w:
            for key, val in f.metadata.items():
                if key not in ("general.alignment", "general.file_type",
                               "general.quantization_version"):  # fmt: skip
                    w.add_key_value(key, val, f.metadata_types[key])
            w.add_file_type(_file_type(recipe))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for n, t in f.tensors.items():
                w.add_tensor_info(n, t.shape, plan[n])
            items: Any = f.tensors.items()
            if progress:
                with contextlib.suppress(ImportError):
                    from tqdm.auto import tqdm

                    items = tqdm(list(items), desc=f"quantize {recipe.name}", unit="tensor")
            for n, t in items:
                if plan[n] == t.qtype:
                    w.write_tensor_data(t.data, raw_dtype=t.ggml_type)
                else:
                    x = t.dequantize()
                    imp = imatrix.values(n) if imatrix is not None else None
                    imp = imp if plan[n] in IMATRIX_QTYPES else None
                    w.write_tensor_data(x if plan[n] == "f32" else quantize(x, plan[n], imp))
    return plan
