"""CPU/GPU offload: place as many blocks of a model as fit a GPU memory budget on the GPU, the rest
on the CPU, and move activations between them with forward hooks.

    plan = ferroquant.offload(model, max_gpu_memory="4GiB")   # or a device map
    print(plan)                                                # per-module device and bytes
    model.generate(...)                                        # works across the split
    plan.remove()                                              # uninstall the hooks

Blocks (in execution order): the decoder layers of a Hugging Face model (the modules named in its
`_no_split_modules`, else the elements of its largest nn.ModuleList), each one a unit; beside them
every sibling of the layer list and of its ancestors (embedding, rotary embedding, final norm,
output head) is a unit of its own. A model without layers is split into its top-level children.

Placement policy (automatic): decoder layers, in order, go to the GPU while their bytes (every
parameter and buffer: QuantLinear's quantized `qweight` and `qstats`, norms, biases; a tensor
shared by two modules counted once) fit `max_gpu_memory`; from the first layer that does not fit,
the rest stay on the CPU, so activations cross devices once each way per forward. The embedding,
the final norm and the output head stay on the CPU: the embedding is a row lookup, and in many
models (SmolLM2, Llama-3.2 1B/3B) the head shares its weight with the embedding. A device map
places them anywhere. The budget counts weights only: leave room for activations and the KV cache.

With no usable CUDA device (or max_gpu_memory=0) everything stays on the CPU, runs the Rust
kernels, no hook is installed, and the returned plan says so. An explicit CUDA device (the
`device` argument or a device map) without a GPU is an error (`ferroquant.cuda.CudaUnavailable`).

Hooks: each unit gets a forward pre-hook that moves the tensors of its args and kwargs (nested in
tuples, lists, dicts, dataclasses and ModelOutputs: e.g. the (cos, sin) position embeddings) to its
device. Hugging Face cache objects are passed through: each layer's cache entries are created on
the device that layer runs on and stay there; entries of a unit's own layer found elsewhere (a
cache filled before offloading) are moved once. A unit nested in a unit of another device moves its
outputs back to the enclosing unit's device; the model's outputs come back on the CPU. GPU blocks
run ferroquant's CUDA kernels on bf16/fp16 activations (cast the model to bfloat16); float32
activations there take the reference path.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_MEM = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | float | str) -> int:
    """Bytes from an integer (bytes) or a string like "4GiB", "4GB", "512 MiB", "1.5GB", "0"
    (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"max_gpu_memory must be bytes or a size like '4GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or value != value:
            raise ValueError(f"max_gpu_memory must be >= 0 bytes, got {value!r}")
        return int(value)
    m = _MEM.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"max_gpu_memory {value!r} does not parse: give bytes (an integer) or a number with "
            "a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


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
    handles: list[Any] = field(default_factory=list, repr=False)

    def bytes_on(self, device: str) -> int:
        return sum(p.nbytes for p in self.placements if p.device == device)

    def devices(self) -> dict[str, str]:
        return {p.name: p.device for p in self.placements}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
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


# -- the model's units --------------------------------------------------------------------------


def _layer_list(model: nn.Module) -> str | None:
    """Name of the ModuleList holding the decoder layers, or None."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[int, str] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        named = no_split and all(type(m).__name__ in no_split for m in mod)
        size = sum(p.numel() for p in mod.parameters()) + sum(b.numel() for b in mod.buffers())
        score = (int(bool(named)), size)
        if best is None or score > best[:2]:
            best = (*score, name)  # type: ignore[assignment]
    return best[2] if best is not None else None  # type: ignore[misc]


def units(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, kind) of the units, in the model's definition order (execution order for
    the usual layouts): the layers (kind "layer") and the siblings of the layer list and of its
    ancestors (kind "other"); a model without a layer list: its top-level children."""
    lst = _layer_list(model)
    if lst is None:
        return [(n, "other") for n, _ in model.named_children()]

    def walk(prefix: str, parts: list[str]) -> list[tuple[str, str]]:
        parent = model.get_submodule(prefix) if prefix else model
        out: list[tuple[str, str]] = []
        for child, mod in parent.named_children():
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
    best = None
    for u in unit_names:
        if (u == "" or name == u or name.startswith(u + ".")) and (
            best is None or len(u) > len(best)
        ):
            best = u
    return best


def _owned(model: nn.Module, unit_names: list[str]) -> dict[str, dict[int, torch.Tensor]]:
    """Each unit's tensors (parameters and buffers) not inside a deeper unit; a tensor shared
    by several modules belongs to the first unit that holds it."""
    out: dict[str, dict[int, torch.Tensor]] = {u: {} for u in unit_names}
    seen: set[int] = set()
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for u in unit_names:  # unit order decides who owns a shared tensor
        for name, t in named:
            if id(t) in seen or _owner(name, unit_names) != u:
                continue
            seen.add(id(t))
            out[u][id(t)] = t
    return out


def unit_bytes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Bytes of each unit's own parameters and buffers (a tensor shared by several units is
    counted in the first one; a nested unit's tensors are not counted in its parent)."""
    return {
        u: sum(t.numel() * t.element_size() for t in ts.values())
        for u, ts in _owned(model, names).items()
    }


def plan_placement(
    layers: list[tuple[str, int]], others: list[tuple[str, int]], budget: int, gpu: str | None
) -> list[tuple[str, str]]:
    """The automatic policy as a pure function: layers (name, bytes) in execution order go to
    `gpu` while the running total fits `budget`; from the first that does not fit, the rest and
    every other unit stay on "cpu". No gpu or budget 0: everything on the CPU."""
    out: list[tuple[str, str]] = [(n, "cpu") for n, _ in others]
    used = 0
    full = gpu is None or budget <= 0
    for name, nbytes in layers:
        if not full and used + nbytes <= budget:
            used += nbytes
            out.append((name, gpu))  # type: ignore[arg-type]
        else:
            full = True
            out.append((name, "cpu"))
    return out


# -- devices -------------------------------------------------------------------------------------


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

    def device_of(name: str) -> str:
        key = _owner(name, list(devmap))
        return devmap[key] if key is not None else "cpu"

    # the root key "" only sets the default device; a key deeper than an automatic unit is a
    # unit nested in it
    names = [n for n, _ in auto if not any(n.startswith(k + ".") for k in devmap if k)]
    names += [k for k in devmap if k and k not in names]
    return [(n, device_of(n)) for n in names]


# -- moving activations ---------------------------------------------------------------------------


def _is_cache(obj: Any) -> bool:
    return any(c.__name__ == "Cache" and "cache_utils" in c.__module__ for c in type(obj).__mro__)


def to_device(obj: Any, device: str) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts, dataclasses, ModelOutputs) on
    `device`; Hugging Face cache objects and everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == device or str(obj.device) == device else obj.to(device)
    if _is_cache(obj):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        if type(obj) is dict:
            return moved
        out = obj.__class__(**moved) if dataclasses.is_dataclass(obj) else type(obj)(moved)
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def _layer_index(mod: nn.Module) -> int | None:
    for sub in mod.modules():
        idx = getattr(sub, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


def _move_cache_layer(cache: Any, idx: int | None, device: str) -> None:
    layers = getattr(cache, "layers", None)
    if idx is None or layers is None or idx >= len(layers):
        return
    layer = layers[idx]
    for attr in ("keys", "values"):
        t = getattr(layer, attr, None)
        if isinstance(t, torch.Tensor) and t.device != torch.device(device):
            setattr(layer, attr, t.to(device))
    if hasattr(layer, "device") and getattr(layer, "keys", None) is not None:
        layer.device = layer.keys.device


def _pre_hook(device: str, idx: int | None) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for v in (*args, *kwargs.values()):
            if _is_cache(v):
                _move_cache_layer(v, idx, device)
        return to_device(args, device), to_device(kwargs, device)

    return hook


def _post_hook(device: str) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return to_device(output, device)

    return hook


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
    if device_map is not None:
        assigned = _resolve_device_map(model, device_map, auto)
        budget: int | None = None
        gpus = sorted({d for _, d in assigned if d.startswith("cuda")})
        for g in gpus:
            _check_cuda(g)
        gpu = gpus[0] if gpus else None
        note = "device map" + ("" if gpus else ": every module on the CPU (Rust kernels)")
    else:
        budget = parse_memory(max_gpu_memory)
        if device is not None:
            gpu = _device_name(device)
            if gpu != "cpu":
                _check_cuda(gpu)
            else:
                gpu = None
            why = "device='cpu'"
        else:
            from ..cuda import nvrtc as _cuda

            gpu = "cuda:0" if _cuda.available(0) else None
            why = "no usable CUDA device"
        layer_names = [n for n, k in auto if k == "layer"]
        sizes = unit_bytes(model, [n for n, _ in auto])
        layers = [(n, sizes[n]) for n in layer_names]
        others = [(n, sizes[n]) for n, k in auto if k != "layer"]
        order = {n: i for i, (n, _) in enumerate(auto)}
        assigned = sorted(plan_placement(layers, others, budget, gpu), key=lambda a: order[a[0]])
        if gpu is None or budget == 0:
            note = f"{why if gpu is None else 'max_gpu_memory=0'}: every module on the CPU " \
                "(Rust kernels)"  # fmt: skip
            gpu = None
        else:
            n_gpu = sum(1 for _, d in assigned if d == gpu)
            note = f"{n_gpu} of {len(layers)} layers on {gpu} (budget {_fmt(budget)})"
    kinds = dict(auto)
    names = [n for n, _ in assigned]
    sizes = unit_bytes(model, names)
    _check_ties(model, assigned)
    placements = [Placement(n, d, sizes[n], kinds.get(n, "other")) for n, d in assigned]
    plan = OffloadPlan(placements, budget, gpu, note)
    # every unit to its device (also back to the CPU after an earlier offload); outer first
    for name, dev in sorted(assigned, key=lambda a: a[0].count(".")):
        model.get_submodule(name).to(dev)
    if device_map is not None or any(d != "cpu" for _, d in assigned):
        _install(model, plan)
    model.ferroquant_offload = plan
    return plan


def _check_ties(model: nn.Module, assigned: list[tuple[str, str]]) -> None:
    """A tensor used by modules of two units on different devices cannot be placed."""
    devs = dict(assigned)
    names = list(devs)
    where: dict[int, tuple[str, str]] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for pname, t in named:
        u = _owner(pname, names)
        dev = devs[u] if u is not None else "cpu"
        prev = where.setdefault(id(t), (pname, dev))
        if prev[1] != dev:
            raise ValueError(
                f"{prev[0]} and {pname} are one tensor (tied weights?) but would be placed on "
                f"{prev[1]} and {dev}; place their modules on one device"
            )


def _install(model: nn.Module, plan: OffloadPlan) -> None:
    devs = {p.name: p.device for p in plan.placements}
    for p in plan.placements:
        mod = model.get_submodule(p.name)
        h = mod.register_forward_pre_hook(_pre_hook(p.device, _layer_index(mod)), with_kwargs=True)
        plan.handles.append(h)
        # nested in a unit of another device: hand the outputs back to it
        parents = [n for n in devs if n != p.name and (n == "" or p.name.startswith(n + "."))]
        if parents:
            outer = devs[max(parents, key=len)]
            if outer != p.device:
                plan.handles.append(mod.register_forward_hook(_post_hook(outer)))
    plan.handles.append(model.register_forward_hook(_post_hook("cpu")))


def remove_offload(model: nn.Module) -> None:
    """Uninstall the hooks of an earlier `offload` (modules stay where they are)."""
    old = getattr(model, "ferroquant_offload", None)
    if isinstance(old, OffloadPlan):
        old.remove()
