"""Layer-by-layer activation capture, shared by every calibrated method.

Only one decoder layer's inputs are held at a time: the calibration windows run through the
embeddings once (stopped at the first decoder layer), then for each layer in turn its Linears'
input statistics are accumulated (hooks), the method quantizes the layer, and the layer's outputs
are computed with the already-quantized weights and become the next layer's inputs (the
sequential scheme of GPTQ and llm-compressor). Peak memory is one layer's inputs and outputs
plus its statistics. The layer runs in float32 while it is calibrated (then goes back to its
dtype). Works for any transformers causal LM whose decoder layers are an `nn.ModuleList`.

The statistics are summed in a fixed decomposition: the windows go through the layer in shards of
`SHARD_WINDOWS` consecutive windows, one batched call a shard (one float32 GEMM x^T x over the
shard's tokens for each input), each shard's product is widened to float64 and the shards are
added to the total in shard order. The layer's outputs are computed by the same batched calls.
`ferroquant.distributed` computes the shards on a Ray cluster with the same functions and adds
them in the same order, so both give the same bits however many workers there are. (A shard in
one call instead of one call a window: several times fewer Python calls and larger GEMMs.)

Precision: the layer's forward passes (statistics and outputs) run under bfloat16 autocast where
the CPU has bfloat16 dot products (`forward_autocast`): the Linears and the attention take bf16
operands and accumulate in float32, as the bf16 model the weights come from runs, about 4x the
float32 GEMM rate on AVX512-BF16; the residual stream and the norms stay float32. The statistics
are x^T x of the Linears' inputs as they reach the Linear: float32 where they are (the norms'
outputs: q/k/v, gate/up), a float32 GEMM of the upper triangle's blocks (`gram`: about 0.65x a
full GEMM's work); bf16 where the bf16 forward made them so (attention's output at o_proj, the
MLP's product at down_proj), exact products of those bf16 values summed in float32 by the Rust
core (`_native.gram_bf16`, rust/core/src/gram.rs): on AMX bf16 tiles where the CPU has them
(the tile unit's summation, within a float64 bound; about 3.5x torch's float32 product), else
on bf16 dot products (one fixed float32 chain per output; 3-4x torch's float32 product), the
same bits on every call and thread count either way. Each shard's product is widened to
float64. (Rounding the float32 inputs to bf16 as well, as the Linear's GEMM reads them,
measured +1.2 % perplexity on SmolLM2 int4_g64 plain GPTQ, 38.22 against 37.77: they stay
float32.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _native

# calibration windows per shard of the statistics (see above); changing it changes the sums'
# last bits, on one machine and on a cluster alike
SHARD_WINDOWS = 8

# the dtype the layers' forward passes autocast to (None: float32 throughout); see the docstring
FORWARD_AUTOCAST: torch.dtype | None = torch.bfloat16
# columns per block of `gram`'s triangular product (a GEMM this wide still runs near full rate)
GRAM_BLOCK = 128
# x^T x of bf16 inputs on the Rust core's bf16 kernel (see the docstring); False: torch's
# float32 product of the same values
GRAM_BF16 = True

# where the common architectures keep their decoder layers
_LAYER_PATHS = (
    "model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h",
    "gpt_neox.layers", "transformer.layers", "layers",
)  # fmt: skip


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of `model`'s decoder layers; ValueError naming what was looked
    for when there is none."""
    for path in _LAYER_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) and _has_linear(mod[0]):
            return path, mod
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(_has_linear(m) for m in mod):
            if n_cfg is not None and len(mod) != n_cfg:
                continue
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found (an nn.ModuleList of blocks holding "
            f"nn.Linear; looked at {', '.join(_LAYER_PATHS)} and every ModuleList"
            + (f" of num_hidden_layers={n_cfg}" if n_cfg is not None else "")
            + "); calibrated methods need a transformers causal LM"
        )
    return best


def _has_linear(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Linear) for x in m.modules())


def _to_float(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.float32)
    if isinstance(x, tuple):
        return tuple(_to_float(v) for v in x)
    if isinstance(x, list):
        return [_to_float(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    return x


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def forward_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a layer's calibration forward pass on `x`'s device autocasts to: bf16 on a CPU
    with native bf16 dot products (`FORWARD_AUTOCAST`), None (float32) elsewhere (emulated bf16
    would be slower than float32, and other devices keep their own)."""
    dtype = FORWARD_AUTOCAST
    if dtype is None or x.device.type != "cpu" or not _cpu_bf16():
        return None
    return dtype


def forward_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The precision of a layer's calibration forward pass on `x` (`forward_dtype`)."""
    dtype = forward_dtype(x)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def _cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x (float32 [d, d], exactly symmetric) of Linear inputs x [n, d]. bf16 x: the exact
    products of its values summed in float32 by the Rust core's bf16 kernel where it is fast
    here (`_native.gram_bf16`, `GRAM_BF16`). Float32 x (or no fast kernel): the float32 product,
    the blocks on and above the diagonal as GEMMs of `GRAM_BLOCK` columns against the columns
    from theirs on (about (1 + 1/b) / 2 of the full product's work for b blocks), mirrored
    below."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and bf16_kernel():
        bits = x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return torch.from_numpy(_native.gram_bf16(bits))
    x = x.to(torch.float32)
    d = x.shape[1]
    if d <= GRAM_BLOCK:
        out = x.T @ x
        return torch.triu(out) + torch.triu(out, 1).T
    out = torch.zeros((d, d), dtype=x.dtype)
    for a in range(0, d, GRAM_BLOCK):
        b = min(a + GRAM_BLOCK, d)
        out[a:b, a:] = x[:, a:b].T @ x[:, a:]
    return torch.triu(out) + torch.triu(out, 1).T


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite: its min and max, NaN propagating (one reduction
    pass; `isfinite(t).all()` writes a boolean tensor first, 10x the time on a layer's output)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def bf16_kernel() -> bool:
    """Whether `gram` runs bf16 inputs on the Rust kernel: `GRAM_BF16` and the kernel fast on
    this CPU (its scalar fallback gives the same bits, too slowly to be worth it)."""
    fast = getattr(_native, "gram_bf16_fast", None)
    return GRAM_BF16 and fast is not None and bool(fast())


@dataclass
class LayerCall:
    """How a decoder layer is called: the arguments after the hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[LayerCall]]:
    """Hidden states entering layer 0 for every window of `ids` [n, L] (float32, [1, L, d] each)
    and each layer's other arguments (recorded on the first window; every window has the same
    length and no padding, so they are the same for all)."""
    calls: list[LayerCall] = [LayerCall() for _ in layers]
    hidden: list[torch.Tensor] = []
    record_all = [True]

    def hook(i: int) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            kw = dict(kwargs)
            h = kw.pop("hidden_states") if "hidden_states" in kw else args[0]
            rest = args[1:] if "hidden_states" not in kwargs else args
            if i == 0:
                hidden.append(h.detach().to(torch.float32))
            if record_all[0]:
                calls[i] = LayerCall(_to_float(tuple(rest)), _to_float(kw))
            if i == len(layers) - 1 or not record_all[0]:
                raise _Stop

        return pre

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        for k in range(ids.shape[0]):
            record_all[0] = k == 0
            try:
                model(input_ids=ids[k : k + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return hidden, calls


class InputStats:
    """Second moments of the inputs of a layer's Linears, shared by Linears that receive the same
    tensor (q/k/v, gate/up): `groups()` -> [(names, H = 2/n sum x x^T, n)]; and the float64 sums
    of |x| per input channel, `abs_sums` (AWQ's activation statistic: `mean_abs`).

    Each window's x^T x goes into its shard's partial sum, which `new_sample` adds to `sums`
    every `shard_windows` windows (and `finish` at the end): the decomposition described in the
    module docstring. `abs_sums` follow the same decomposition (None: not known, e.g. shards
    added without them)."""

    def __init__(
        self,
        layer: nn.Module,
        where: str,
        names: list[str] | None = None,
        shard_windows: int = SHARD_WINDOWS,
        stop_when_seen: bool = False,
    ) -> None:
        self.where = where
        self.linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        if names is not None:
            self.linears = {n: m for n, m in self.linears.items() if n in names}
        self.group_of: dict[str, int] = {}
        # the calibration windows as a per-window map (`LocalWindows` here, a Ray runner's on a
        # cluster), for methods that need per-window results (AWQ's searches)
        self.windows: Any = None
        self.sums: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.abs_sums: list[torch.Tensor] | None = []
        self.shard_windows = shard_windows
        self._part: list[torch.Tensor] = []  # the current shard's partial sums
        self._abs_part: list[torch.Tensor] = []
        self._in_shard = 0  # windows begun in the current shard
        self._seen: list[tuple[torch.Tensor, int]] = []
        # end the layer's forward once every Linear has had its input (collect_stats: what
        # follows the last Linear, e.g. down_proj's own GEMM, is not needed for the statistics)
        self._stop_when_seen = stop_when_seen
        self._called: set[str] = set()
        self._handles = [
            m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            self._called.add(name)
            for t, g in self._seen:
                if t is x:
                    self.group_of.setdefault(name, g)
                    self._maybe_stop()
                    return
            g = self.group_of.get(name)
            if g is None:
                g = self.group_of[name] = len(self.sums)
                self.sums.append(torch.zeros((x.shape[-1],) * 2, dtype=torch.float64))
                self._part.append(torch.zeros_like(self.sums[-1]))
                self._abs_part.append(torch.zeros(x.shape[-1], dtype=torch.float64))
                if self.abs_sums is not None:
                    self.abs_sums.append(torch.zeros_like(self._abs_part[-1]))
                self.counts.append(0)
            x2 = x.detach().reshape(-1, x.shape[-1])
            with torch.autocast(x2.device.type, enabled=False):  # float32 sums, always
                prod = gram(x2)
            # the diagonal holds each input's sum of squares: non-finite iff some x is (or its
            # squares overflow float32, which the Hessian could not hold either); d values to
            # check instead of every activation
            if not bool(torch.isfinite(torch.diagonal(prod)).all()):
                raise ValueError(f"non-finite activations at the input of {self.where}.{name}")
            self._part[g] += prod.to(torch.float64)
            self._abs_part[g] += x2.abs().sum(0, dtype=torch.float64)
            self.counts[g] += x2.shape[0]
            self._seen.append((x, g))
            self._maybe_stop()

        return pre

    def _maybe_stop(self) -> None:
        if self._stop_when_seen and len(self._called) == len(self.linears):
            raise _Stop

    def new_sample(self) -> None:
        """Called before each window: a new shard every `shard_windows` windows."""
        if self._in_shard == self.shard_windows:
            self.finish()
        self._in_shard += 1
        self._seen.clear()
        self._called.clear()

    def finish(self) -> None:
        """Add the current shard's partial sums to the totals (called after the last window)."""
        for total, part in zip(self.sums, self._part, strict=True):
            total += part
            part.zero_()
        for total, part in zip(self.abs_sums or [], self._abs_part, strict=False):
            total += part
            part.zero_()
        self._in_shard = 0

    def add_shard(
        self,
        sums: list[torch.Tensor],
        counts: list[int],
        group_of: dict[str, int],
        abs_sums: list[torch.Tensor] | None = None,
    ) -> None:
        """Add one shard's finished statistics (another `InputStats`' `sums`, `counts`,
        `group_of` and `abs_sums`, computed elsewhere on the same layer), as `finish` adds its
        own. A shard without `abs_sums` leaves them unknown (None)."""
        if not self.sums:
            self.group_of = dict(group_of)
            self.sums = [torch.zeros_like(s) for s in sums]
            self._part = [torch.zeros_like(s) for s in sums]
            self.counts = [0] * len(sums)
            self.abs_sums = [torch.zeros(s.shape[0], dtype=torch.float64) for s in sums]
        if group_of != self.group_of or len(sums) != len(self.sums):
            raise ValueError(f"{self.where}: a shard's Linears share their inputs differently")
        if abs_sums is None or len(abs_sums) != len(sums):
            self.abs_sums = None
        for g, (s, n) in enumerate(zip(sums, counts, strict=True)):
            self.sums[g] += s
            self.counts[g] += n
            if self.abs_sums is not None and abs_sums is not None:
                self.abs_sums[g] += abs_sums[g]

    def mean_abs(self, name: str) -> torch.Tensor | None:
        """Mean over the tokens of |x| per input channel of Linear `name`'s inputs (float32),
        from `abs_sums`; None when they are not known or the Linear was never called."""
        g = self.group_of.get(name)
        if self.abs_sums is None or g is None or g >= len(self.abs_sums):
            return None
        return (self.abs_sums[g] / max(self.counts[g], 1)).to(torch.float32)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def groups(self) -> Iterator[tuple[list[str], torch.Tensor, int]]:
        for g, (s, n) in enumerate(zip(self.sums, self.counts, strict=True)):
            names = [k for k, v in self.group_of.items() if v == g]
            yield names, s * (2.0 / max(n, 1)), n


class LocalWindows:
    """The layer's calibration windows, here: `map(layer, fn, *args)` runs `fn(layer, call,
    windows, first, *args)` on them (first: the index of the first window) and returns its list
    of per-window results. `ferroquant.distributed` runs the same `fn` per shard on a cluster
    and concatenates the lists in shard order, so per-window results added in window order give
    the same bits."""

    def __init__(self, call: LayerCall, hidden: list[torch.Tensor]) -> None:
        self.call, self.hidden = call, hidden
        self.count = len(hidden)
        self.tokens = [int(h.shape[-2]) for h in hidden]

    def map(self, layer: nn.Module, fn: Callable[..., list], *args: Any) -> list:
        with torch.no_grad():
            return fn(layer, self.call, self.hidden, 0, *args)

    @property
    def stream(self) -> list[torch.Tensor]:
        """The windows' hidden states in the form `map_pair` and `outputs` take a stream."""
        return self.hidden

    def map_pair(
        self,
        layer: nn.Module,
        other: nn.Module | None,
        other_stream: list[torch.Tensor] | None,
        fn: Callable[..., list],
        *args: Any,
    ) -> list:
        """`fn(layer, other, call, windows, other_windows, *args)`: two layers on two streams of
        the same windows (a method's float copy of the layer on the float model's hidden
        states); its per-shard results (a cluster runs `fn` a shard at a time)."""
        with torch.no_grad():
            return fn(layer, other, self.call, self.hidden, other_stream, *args)

    def outputs(self, layer: nn.Module, stream: list[torch.Tensor], where: str) -> list:
        """`layer`'s outputs on `stream` (another stream of these windows), as a stream."""
        with torch.no_grad():
            return layer_outputs(layer, self.call, stream, where)


def collect_stats(
    layer: nn.Module, call: LayerCall, hidden: list[torch.Tensor], where: str
) -> InputStats:
    """The input statistics of `layer`'s Linears over the windows `hidden` (hooks removed)."""
    stats = InputStats(layer, where, stop_when_seen=True)
    try:
        for batch in shard_batches(hidden):
            stats.new_sample()
            try:
                with forward_autocast(batch):
                    layer(batch, *call.args, **call.kwargs)
            except _Stop:
                pass
            stats.finish()
    finally:
        stats.remove()
    return stats


def shard_batches(hidden: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The windows `hidden` ([1, L, d] each) stacked by shard: [<= SHARD_WINDOWS, L, d] each,
    from the first window (a Ray task's list of windows is one shard, so it gets the same
    batch). Windows of different lengths go one at a time."""
    for k in range(0, len(hidden), SHARD_WINDOWS):
        part = hidden[k : k + SHARD_WINDOWS]
        if len({tuple(h.shape[1:]) for h in part}) == 1 and all(h.shape[0] == 1 for h in part):
            yield torch.cat(part) if len(part) > 1 else part[0]
        else:
            yield from part


def layer_outputs(
    layer: nn.Module, call: LayerCall, hidden: list[torch.Tensor], where: str
) -> list[torch.Tensor]:
    """`layer`'s outputs for the windows `hidden`: the next layer's inputs (computed a shard at
    a time, `shard_batches`; one [1, L, d] tensor a window)."""
    out: list[torch.Tensor] = []
    for batch in shard_batches(hidden):
        with forward_autocast(batch):
            y = _first(layer(batch, *call.args, **call.kwargs)).to(batch.dtype)
        if not all_finite(y):
            raise ValueError(f"non-finite activations at the output of {where}")
        out.extend(y.detach().split(1))
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A per-layer progress bar (tqdm's, a context manager too; a silent stand-in when disabled
    or tqdm is missing)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="layer")
        except ImportError:
            pass
    return _NoBar()


def run_layers(
    model: nn.Module,
    ids: torch.Tensor,
    process: Callable[[int, str, nn.Module, InputStats], Callable[[], None] | None],
    *,
    progress: bool = True,
    desc: str = "calibrate",
) -> None:
    """The sequential pipeline: for each decoder layer, collect its Linears' input statistics on
    the calibration windows, call `process(index, layer name, layer, stats)` (which quantizes the
    layer in place and may return a callable run once the layer's outputs are computed, e.g. to swap
    in the quantized modules), then compute the layer's outputs (with its new weights) for the
    next one."""
    prefix, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, ids)
        bar = progress_bar(len(layers), desc, progress)
        for i, layer in enumerate(layers):
            where = f"{prefix}.{i}"
            dtypes = {p.dtype for p in layer.parameters()}
            dtype = dtypes.pop() if len(dtypes) == 1 else None
            layer.to(torch.float32)
            call = calls[i]
            stats = collect_stats(layer, call, hidden, where)
            stats.windows = LocalWindows(call, hidden)
            finish = process(i, where, layer, stats)
            del stats
            hidden = layer_outputs(layer, call, hidden, where)
            if finish is not None:
                finish()
            if dtype is not None:
                layer.to(dtype)
            bar.update(1)
        bar.close()
