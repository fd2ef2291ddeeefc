"""CPU/GPU offload: as many decoder layers as fit a GPU memory budget on the GPU, the rest of the
model on the CPU, activations moved between them by accelerate's hooks (docs/offload.md).

    plan = ferroquant.offload(model, max_gpu_memory="4GiB")   # or a device map
    print(plan)                                                # per-module device and bytes
    plan.remove()                                              # uninstall the hooks

accelerate does the size strings (`convert_file_size_to_int`), the bytes of every module
(`compute_module_sizes`, which counts buffers: QuantLinear's weight is its packed `qweight` and
`qstats`) and the moving of activations (`AlignDevicesHook`, `send_to_device`). Ours: the units
(decoder layers from `_no_split_modules` or the largest ModuleList, and their siblings), the
policy (layers in order while they fit; embedding, norm, head and the rest on the CPU, where
they run with the Rust kernels rather than being streamed to the GPU as in accelerate's plans),
the weights moved by `module.to` (QuantLinear's own `_apply`), each layer's KV cache on its
layer's device, the printed plan, and the errors (`ferroquant.cuda.CudaUnavailable` for a CUDA
device asked for without one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._extras import require

require("accelerate", "ferroquant.offload", "hf")
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module  # noqa: E402
from accelerate.utils import compute_module_sizes, convert_file_size_to_int  # noqa: E402

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(|b|[kmgt]i?b)")


def parse_memory(value: int | float | str) -> int:
    """Bytes from an integer (bytes) or a string like "4GiB", "4GB", "512 MiB", "1.5GB", "0"
    (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024, in any case)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    m = _SIZE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(
            f"max_gpu_memory {value!r} does not parse: give bytes (an integer) or a number with "
            "a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    number, unit = m.groups()
    if unit in ("", "b"):
        return int(float(number))
    if unit[0] == "t":  # accelerate stops at GB / GiB
        number, unit = str(float(number) * (1024 if "i" in unit else 1000)), "g" + unit[1:]
    # accelerate reads a lower-case final "b" as bits: spell the unit its way
    return convert_file_size_to_int(number + unit[0].upper() + unit[1:-1] + "B")


@dataclass
class Placement:
    """One unit: its module name, device, bytes (parameters + buffers) and kind."""

    name: str
    device: str
    nbytes: int
    kind: str  # "layer" or "other"


@dataclass
class OffloadPlan:
    """Where every unit runs. `str(plan)` is a readable table; `remove()` uninstalls the hooks."""

    placements: list[Placement]
    budget: int | None  # bytes; None with a device map
    gpu: str | None  # the GPU device used, None when everything is on the CPU
    note: str
    handles: list[nn.Module] = field(default_factory=list, repr=False)  # the hooked modules

    def bytes_on(self, device: str) -> int:
        return sum(p.nbytes for p in self.placements if p.device == device)

    def devices(self) -> dict[str, str]:
        return {p.name: p.device for p in self.placements}

    def remove(self) -> None:
        for mod in self.handles:
            remove_hook_from_module(mod)
        self.handles.clear()

    def __str__(self) -> str:
        lines = [f"ferroquant offload: {self.note}"]
        width = max((len(p.name) for p in self.placements), default=4)
        for p in self.placements:
            lines.append(f"  {p.name or '(root)':<{width}}  {p.device:<8} {_fmt(p.nbytes):>10}")
        for dev in sorted({p.device for p in self.placements}):
            lines.append(f"  total on {dev}: {_fmt(self.bytes_on(dev))}")
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# -- the model's units and their bytes ----------------------------------------------------------


def _layer_list(model: nn.Module) -> str | None:
    """Name of the ModuleList holding the decoder layers, or None."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[int, int, str] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            named = int(bool(no_split) and all(type(m).__name__ in no_split for m in mod))
            size = sum(t.numel() for t in (*mod.parameters(), *mod.buffers()))
            if best is None or (named, size) > best[:2]:
                best = (named, size, name)
    return best[2] if best is not None else None


def units(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, kind) of the units, in the model's definition order (execution order for
    the usual layouts): the layers (kind "layer") and the siblings of the layer list and of its
    ancestors (kind "other"); a model without a layer list: its top-level children."""
    lst = _layer_list(model)
    if lst is None:
        return [(n, "other") for n, _ in model.named_children()]

    def walk(prefix: str, parts: list[str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for child, mod in (model.get_submodule(prefix) if prefix else model).named_children():
            full = f"{prefix}.{child}" if prefix else child
            if child != parts[0]:
                out.append((full, "other"))
            elif len(parts) == 1:
                out.extend((f"{full}.{i}", "layer") for i in range(len(mod)))
            else:
                out.extend(walk(full, parts[1:]))
        return out

    return walk("", lst.split("."))


def _owner(name: str, unit_names: list[str]) -> str | None:
    """The deepest unit containing the parameter or module `name`."""
    inside = [u for u in unit_names if u == "" or name == u or name.startswith(u + ".")]
    return max(inside, key=len) if inside else None


def unit_bytes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Bytes of each unit's parameters and buffers, by accelerate's `compute_module_sizes` (a
    tensor shared by several modules counted once, with the first; a unit nested in another is
    not counted in its parent)."""
    sizes = compute_module_sizes(model)
    own = {u: sizes.get(u, 0) for u in names}
    for u in names:
        parent = _owner(u, [v for v in names if v != u])
        if parent is not None:
            own[parent] -= sizes.get(u, 0)
    return own


def plan_placement(
    layers: list[tuple[str, int]], others: list[tuple[str, int]], budget: int, gpu: str | None
) -> list[tuple[str, str]]:
    """The automatic policy as a pure function: layers (name, bytes) in execution order go to
    `gpu` while the running total fits `budget`; from the first that does not fit, the rest and
    every other unit stay on "cpu". No gpu or budget 0: everything on the CPU."""
    out: list[tuple[str, str]] = [(n, "cpu") for n, _ in others]
    used, full = 0, gpu is None or budget <= 0
    for name, nbytes in layers:
        full = full or used + nbytes > budget
        used += nbytes
        out.append((name, "cpu" if full else gpu))  # type: ignore[arg-type]
    return out


# -- devices --------------------------------------------------------------------------------------


def _device_name(dev: Any) -> str:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return f"cuda:{dev}"
    try:
        d = torch.device(dev)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {dev!r} is not a torch device (cpu, cuda, cuda:N or N)") from None
    if d.type == "cuda":
        return f"cuda:{0 if d.index is None else d.index}"
    if d.type in ("cpu", "meta"):
        return d.type
    raise ValueError(f"device {dev!r}: offload places modules on cpu or cuda devices only")


def _check_cuda(device: str) -> None:
    from ..cuda import nvrtc as _cuda

    try:
        _cuda.check_device(device)
    except _cuda.CudaUnavailable as e:
        raise _cuda.CudaUnavailable(f"offload to {device} requested, but {e}") from None


def _resolve_device_map(
    model: nn.Module, device_map: dict[str, Any], auto: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Units of a device map: the keys themselves plus the automatic units they do not cover,
    each with the device of its nearest mapped ancestor ("cpu" when none)."""
    known = dict(model.named_modules())
    unknown = [k for k in device_map if k not in known]
    if unknown:
        sample = ", ".join(n for n, _ in auto[:4])
        raise ValueError(
            f"device map names modules the model does not have: {unknown[:5]} (module names "
            f"are model.named_modules() names, e.g. {sample})"
        )
    devmap = {k: _device_name(v) for k, v in device_map.items()}
    # the root key "" only sets the default device; a key deeper than an automatic unit is a
    # unit nested in it
    names = [n for n, _ in auto if not any(n.startswith(k + ".") for k in devmap if k)]
    names += [k for k in devmap if k and k not in names]
    return [(n, devmap.get(_owner(n, list(devmap)) or "", "cpu")) for n in names]


def _check_ties(model: nn.Module, assigned: list[tuple[str, str]]) -> None:
    """A tensor (parameter or buffer) used by units on different devices cannot be placed."""
    devs = dict(assigned)
    where: dict[int, tuple[str, str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        dev = devs.get(_owner(name, list(devs)) or "", "cpu")
        prev = where.setdefault(id(t), (name, dev))
        if prev[1] != dev:
            raise ValueError(
                f"{prev[0]} and {name} are one tensor (tied weights?) but would be placed on "
                f"{prev[1]} and {dev}; place their modules on one device"
            )


# -- moving activations ---------------------------------------------------------------------------


class _UnitHook(AlignDevicesHook):
    """accelerate's hook moving a unit's inputs to its device, minus the weight placement
    (`offload` moved the weights with `module.to`, QuantLinear's own way), plus the unit's
    layer of a Hugging Face cache: entries found on another device (a cache filled before
    offloading) are moved once; new entries are made on the device the layer runs on."""

    def __init__(self, device: str | None, layer_idx: int | None, **kwargs: Any) -> None:
        super().__init__(execution_device=device, **kwargs)
        self.layer_idx = layer_idx

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        for cache in (*args, *kwargs.values()):
            layers = getattr(cache, "layers", None)
            if self.layer_idx is not None and isinstance(layers, list):
                _move_cache_layer(layers, self.layer_idx, self.execution_device)
        return super().pre_forward(module, *args, **kwargs)


def _move_cache_layer(layers: list, idx: int, device: str) -> None:
    layer = layers[idx] if idx < len(layers) else None
    keys = getattr(layer, "keys", None)
    if not isinstance(keys, torch.Tensor) or keys.device == torch.device(device):
        return
    layer.keys, layer.values = keys.to(device), layer.values.to(device)
    if hasattr(layer, "device"):
        layer.device = layer.keys.device


def _layer_index(mod: nn.Module) -> int | None:
    idx = (getattr(sub, "layer_idx", None) for sub in mod.modules())
    return next((i for i in idx if isinstance(i, int)), None)


def _install(model: nn.Module, plan: OffloadPlan) -> None:
    """A hook on every unit (a unit nested in another hands its outputs back to the enclosing
    unit's device) and one on the model (its outputs go back to the inputs' device)."""
    skip = getattr(model, "_skip_keys_device_placement", None)
    names = [p.name for p in plan.placements]
    for p in plan.placements:
        mod = model.get_submodule(p.name)
        nested = _owner(p.name, [n for n in names if n != p.name]) is not None
        hook = _UnitHook(p.device, _layer_index(mod), io_same_device=nested, skip_keys=skip)
        add_hook_to_module(mod, hook)
        plan.handles.append(mod)
    add_hook_to_module(model, _UnitHook(None, None, io_same_device=True, skip_keys=skip))
    plan.handles.append(model)


# -- the entry point ------------------------------------------------------------------------------


def offload(
    model: nn.Module,
    max_gpu_memory: int | str | dict[str, Any] = 0,
    device: Any = None,
    *,
    device_map: dict[str, Any] | None = None,
) -> OffloadPlan:
    """Place `model`'s blocks on a GPU (as many as fit `max_gpu_memory`) and the CPU, install the
    hooks that move activations, and return the plan (see the module docstring). The second
    argument may also be an accelerate-style device map {"model.layers.0": "cuda:0", ...};
    modules the map does not cover stay on the CPU. `device`: the GPU ("cuda", "cuda:1", 1);
    None: cuda:0 when a usable GPU is present, else everything stays on the CPU."""
    if isinstance(max_gpu_memory, dict):
        if device_map is not None:
            raise ValueError("give the device map once (second argument or device_map=)")
        device_map, max_gpu_memory = max_gpu_memory, 0
    remove_offload(model)
    auto = units(model)
    budget: int | None = None
    if device_map is not None:
        assigned = _resolve_device_map(model, device_map, auto)
        gpus = sorted({d for _, d in assigned if d.startswith("cuda")})
        for g in gpus:
            _check_cuda(g)
        gpu = gpus[0] if gpus else None
        note = "device map" + ("" if gpus else ": every module on the CPU (Rust kernels)")
    else:
        budget = parse_memory(max_gpu_memory)
        if device is not None:
            gpu = None if _device_name(device) == "cpu" else _device_name(device)
            if gpu is not None and gpu.startswith("cuda"):
                _check_cuda(gpu)
            why = "device='cpu'"
        else:
            from ..cuda import nvrtc as _cuda

            gpu = "cuda:0" if _cuda.available(0) else None
            why = "no usable CUDA device"
        sizes = unit_bytes(model, [n for n, _ in auto])
        layers = [(n, sizes[n]) for n, k in auto if k == "layer"]
        chosen = dict(plan_placement(layers, [], budget, gpu))
        assigned = [(n, chosen.get(n, "cpu")) for n, _ in auto]
        if gpu is None or budget == 0:
            why = why if gpu is None else "max_gpu_memory=0"
            note, gpu = f"{why}: every module on the CPU (Rust kernels)", None
        else:
            n_gpu = sum(1 for d in chosen.values() if d == gpu)
            note = f"{n_gpu} of {len(layers)} layers on {gpu} (budget {_fmt(budget)})"
    _check_ties(model, assigned)
    kinds, sizes = dict(auto), unit_bytes(model, [n for n, _ in assigned])
    plan = OffloadPlan(
        [Placement(n, d, sizes[n], kinds.get(n, "other")) for n, d in assigned], budget, gpu, note
    )
    # every unit to its device (also back to the CPU after an earlier offload), outer first:
    # module.to, so that QuantLinear._apply keeps its statistics float32
    for name, dev in sorted(assigned, key=lambda a: a[0].count(".")):
        model.get_submodule(name).to(dev)
    if device_map is not None or any(d != "cpu" for _, d in assigned):
        _install(model, plan)
    model.ferroquant_offload = plan
    return plan


def remove_offload(model: nn.Module) -> None:
    """Uninstall the hooks of an earlier `offload` (modules stay where they are)."""
    old = getattr(model, "ferroquant_offload", None)
    if isinstance(old, OffloadPlan):
        old.remove()
