"""The peers of `bench_calib.py`'s int4/g64 rows: GPTQModel and llm-compressor's GPTQ and AWQ,
W4A16, groups of 64, asymmetric (an integer zero point), on the same calibration tokens as ours.

Each peer quantizes its own copy of the baseline model (saved as a Hugging Face folder, bf16, the
same weights `bench_calib.py` holds) with its defaults for the rest (GPTQModel 7.7: desc_act
off, act_group_aware on, damp 0.05, true_sequential; llm-compressor 0.14: actorder "static",
dampening 0.01, block 128). The quantized weights each peer produced are put into a float32 copy
of the baseline, so that the same scoring code measures them (float32 arithmetic: if anything,
kinder to the peers than our rows' kernels): GPTQModel's `dequantize_weight()` of its packed
modules (its checkpoint saved and reloaded by GPTQModel); llm-compressor's s * (q - z) of the
fake-quantized `weight` its GPTQ leaves in every Linear (checked to sit on its scale / zero
grid). Time = wall time of the peer's quantize call (loading the folder excluded), same torch
threads.

AWQ also rescales the RMSNorm weights (the input scales folded into them), so the AWQ peers
hand over every float tensor of their result, not only the Linears: GPTQModel's AWQ (its
`AWQConfig`, GEMM format, its defaults: grid 20, duo scaling, clip search) is saved and read back
by `ferroquant.models.ecosystem.load_checkpoint` (its AWQ GEMM reader, then dequantized);
llm-compressor's `AWQModifier` (its defaults: grid 20, duo scaling, no clip search) followed by a
`QuantizationModifier` W4A16 asymmetric leaves scaled norms, float weights and their 4-bit
scales / zeros in the model, which its own `fake_quantize` turns into the quantized weights.
llm-compressor's AWQ pins its activation cache (`IntermediatesCache.pin_memory`) for faster
host-to-GPU copies; pinning needs a GPU, so on a CPU-only machine that method is made a no-op
inside the peer's call only (monkeypatched, restored after)."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@contextlib.contextmanager
def _in(folder: Path) -> Iterator[None]:
    """Run in `folder` (GPTQModel writes its logs/ into the working folder)."""
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def save_base(model: nn.Module, tokenizer: object, path: Path) -> None:
    """The baseline model as a Hugging Face folder (the peers' input): its weights in a fresh
    model of its config (one loaded from a GGUF carries transformers' gguf quantizer, which
    refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _into_float_copy(base: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(base)
    for t in (*m.parameters(), *m.buffers()):  # float32 (the gguf-loaded model refuses .float())
        if t.is_floating_point():
            t.data = t.data.to(torch.float32)
    for name, w in weights.items():
        lin = m.get_submodule(name)
        if tuple(lin.weight.shape) != tuple(w.shape):
            raise ValueError(
                f"{name}: peer weight {tuple(w.shape)}, model {tuple(lin.weight.shape)}"
            )
        lin.weight = nn.Parameter(w.detach().to("cpu", torch.float32).clone(), requires_grad=False)
    return m


def _state_into_float_copy(
    base: nn.Module, state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """A float32 copy of `base` holding the Linear `weights` and every other float parameter of
    `state` (a peer's whole result: the AWQ peers change the norms as well as the Linears)."""
    m = _into_float_copy(base, weights or {})
    own = dict(m.named_parameters())
    done = {f"{n}.weight" for n in weights or {}}
    for name, t in state.items():
        if name not in own or name in done or not t.is_floating_point():
            continue  # packed / integer / observer tensors are not the model's parameters
        if tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: peer {tuple(t.shape)}, model {tuple(own[name].shape)}")
        own[name].data = t.detach().to("cpu", torch.float32).clone()
    return m


def _decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, mod in model.named_modules() if ".layers." in n and isinstance(mod, nn.Linear)]


def _gptqmodel_quantize(
    folder: Path, qc: object, calib: torch.Tensor, out: Path
) -> tuple[float, float]:
    """Load `folder` into GPTQModel with config `qc`, quantize on `calib` [n, len], save the result
    to `out` (its in-memory modules may be offloaded to meta, so callers read the saved copy);
    returns (wall seconds, CPU seconds of this process) of the quantize call alone."""
    from gptqmodel import GPTQModel

    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * int(r.numel())} for r in calib]
    model = GPTQModel.load(str(folder), qc, device="cpu")
    t0, c0 = time.perf_counter(), time.process_time()
    model.quantize(rows, batch_size=1)
    dt = (time.perf_counter() - t0, time.process_time() - c0)
    model.save(str(out))
    return dt


def gptqmodel_gptq(
    base: nn.Module, folder: Path, calib: torch.Tensor, group: int = 64
) -> tuple[nn.Module, tuple[float, float]]:
    """GPTQModel's GPTQ (4-bit, group `group`, asymmetric) on `calib` [n, len]: (a float copy
    of `base` holding its quantized weights, (wall seconds, CPU seconds of this process))."""
    from gptqmodel import GPTQModel, QuantizeConfig

    names = _decoder_linears(base)
    with tempfile.TemporaryDirectory() as tmp, _in(Path(tmp)):
        qc = QuantizeConfig(bits=4, group_size=group, sym=False)
        dt = _gptqmodel_quantize(folder, qc, calib, Path(tmp) / "out")
        inner = GPTQModel.load(str(Path(tmp) / "out"), device="cpu", dtype=torch.float16).model
        weights = {n: inner.get_submodule(n).dequantize_weight().T.detach().float() for n in names}
    return _into_float_copy(base, weights), dt


def _llmcompressor_inputs(calib, group: int):
    """llm-compressor's calibration dataset (every window unmasked) and its asymmetric int4
    group scheme: the same for its GPTQ and its AWQ."""
    from compressed_tensors.quantization import QuantizationArgs
    from datasets import Dataset

    n, length = calib.shape
    ds = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": [[1] * length for _ in range(n)]}
    )
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, group_size=group,
                            strategy="group")  # fmt: skip
    return ds, args


def llmcompressor_gptq(
    base: nn.Module, folder: Path, calib: torch.Tensor, group: int = 64
) -> tuple[nn.Module, tuple[float, float]]:
    """llm-compressor's GPTQModifier (W4A16, group `group`, asymmetric) through `oneshot` on
    `calib` [n, len]: (a float copy of `base` holding its quantized weights, (wall seconds, CPU
    seconds of this process))."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    names = _decoder_linears(base)
    n, length = calib.shape
    ds, args = _llmcompressor_inputs(calib, group)
    recipe = GPTQModifier(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp, _in(Path(tmp)):
        t0, c0 = time.perf_counter(), time.process_time()
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n,
                max_seq_length=length, shuffle_calibration_samples=False)  # fmt: skip
        dt = (time.perf_counter() - t0, time.process_time() - c0)
    return _into_float_copy(base, _on_grid(model, names, group)), dt


def _on_grid(model: nn.Module, names: list[str], group: int) -> dict[str, torch.Tensor]:
    """{name: s * (q - z)} of llm-compressor's fake-quantized Linears, each checked to sit on its
    4-bit scale / zero grid."""
    weights = {}
    for name in names:
        mod = model.get_submodule(name)
        w = mod.weight.detach().float()
        s = mod.weight_scale.detach().float().repeat_interleave(group, dim=1)
        z = mod.weight_zero_point.detach().float().repeat_interleave(group, dim=1)
        q = torch.round(w / s + z)  # its codes (signed: -8..7 around its zero point)
        if not torch.allclose(s * (q - z), w, rtol=1e-3, atol=1e-7) or (q.max() - q.min()) > 15:
            raise ValueError(f"{name}: llm-compressor's weight is not on its 4-bit grid")
        weights[name] = s * (q - z)
    return weights


def gptqmodel_awq(
    base: nn.Module, folder: Path, calib: torch.Tensor, group: int = 64
) -> tuple[nn.Module, tuple[float, float]]:
    """GPTQModel's AWQ (4-bit, group `group`, asymmetric, GEMM format) on `calib` [n, len]: (a
    float copy of `base` holding its result, (wall seconds, CPU seconds of this process))."""
    from gptqmodel import AWQConfig

    from ferroquant.models.ecosystem import load_checkpoint
    from ferroquant.models.gguf_model import dequantize_model

    with tempfile.TemporaryDirectory() as tmp, _in(Path(tmp)):
        qc = AWQConfig(bits=4, group_size=group, sym=False)
        dt = _gptqmodel_quantize(folder, qc, calib, Path(tmp) / "out")
        got = dequantize_model(load_checkpoint(Path(tmp) / "out"))
        state = dict(got.state_dict())
    return _state_into_float_copy(base, state), dt


def llmcompressor_awq(
    base: nn.Module, folder: Path, calib: torch.Tensor, group: int = 64
) -> tuple[nn.Module, tuple[float, float]]:
    """llm-compressor's AWQModifier + QuantizationModifier (W4A16, group `group`, asymmetric)
    through `oneshot` on `calib` [n, len]: (a float copy of `base` holding its result, (wall
    seconds, CPU seconds of this process))."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM

    names = _decoder_linears(base)
    n, length = calib.shape
    ds, args = _llmcompressor_inputs(calib, group)
    recipe = [
        AWQModifier(),
        QuantizationModifier(
            config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
            ignore=["lm_head"],
        ),
    ]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # pinning needs a GPU
    try:
        with tempfile.TemporaryDirectory() as tmp, _in(Path(tmp)):
            t0, c0 = time.perf_counter(), time.process_time()
            oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n,
                    max_seq_length=length, shuffle_calibration_samples=False)  # fmt: skip
            dt = (time.perf_counter() - t0, time.process_time() - c0)
    finally:
        IntermediatesCache.pin_memory = pin
    with torch.no_grad():  # its RTN step leaves float weights + scale / zero: apply them as it does
        for name in names:
            mod = model.get_submodule(name)
            mod.weight.data = fake_quantize(
                mod.weight.data, mod.weight_scale, mod.weight_zero_point, args
            )
    return _state_into_float_copy(base, model.state_dict(), _on_grid(model, names, group)), dt
