"""A per-weight calibrated solver (GPTQ) applied to a whole model, layer by layer, on the shared
capture (`ferroquant.calib.run_layers`). Linears sharing an input (q/k/v, gate/up) share one
Hessian; those of them that get the same qtype are solved as one stacked matrix (GPTQ treats
rows independently, so this is the same result, faster).

Where the layers and the solves run is a `LocalRunner` (this machine) or
`ferroquant.distributed`'s Ray runner: the same statistics, the same solves, the same bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib import InputStats, run_layers
from ..nn import QuantLinear
from ..tensor import QTensor, QuantizeError
from .gptq import GPTQConfig, gptq_quantize
from .grid import SUPPORTED

_OPTION_QTYPES = ("nf4", "fp4", "int8", "fp8_e4m3", "fp8_e5m2")


def format_options(qtype: str, options: dict[str, Any]) -> dict[str, Any]:
    """The `ferroquant.quantize` options that apply to `qtype` (block_size & co. are nf4/fp4/
    int8/fp8's)."""
    return options if qtype in _OPTION_QTYPES else {}


def row_slice(qt: QTensor, r0: int, r1: int) -> QTensor:
    """Rows r0:r1 of a 2-D tensor (every supported format stores whole rows contiguously, and
    its statistics per row or per block of a row)."""
    rows = qt.shape[0]
    data = np.asarray(qt.data).reshape(rows, -1)[r0:r1]
    stats = np.asarray(qt.stats)
    if stats.size:
        stats = stats.reshape(rows, -1)[r0:r1]
    data = np.ascontiguousarray(data).reshape(-1)
    stats = np.ascontiguousarray(stats).reshape(-1)
    return QTensor(qt.qtype, (r1 - r0, qt.shape[1]), data, qt.block_size, stats, qt.scale_mode)


@dataclass
class SolveJob:
    """One GPTQ solve: the stacked weights of Linears sharing an input and a qtype."""

    weight: torch.Tensor
    hessian: torch.Tensor
    qtype: str
    config: GPTQConfig
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    cross: torch.Tensor | None = None  # the asymmetric target's D (GPTQConfig.asym_alpha)

    def run(self) -> tuple[QTensor, torch.Tensor]:
        return gptq_quantize(
            self.weight,
            self.hessian,
            self.qtype,
            self.config,
            name=self.name,
            cross=self.cross,
            **self.options,
        )


class LocalRunner:
    """The layer-by-layer pipeline and the GPTQ solves, on this machine."""

    def run_layers(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        process: Callable[[int, str, nn.Module, InputStats], Callable[[], None] | None],
        *,
        progress: bool = True,
        desc: str = "calibrate",
        carry: Any = None,
    ) -> None:
        """`calib.run_layers`; `carry` (a method's own second stream, which a cluster runner
        journals) needs nothing here: the method holds it."""
        run_layers(model, ids, process, progress=progress, desc=desc)

    def solve(self, jobs: list[SolveJob]) -> list[tuple[QTensor, torch.Tensor]]:
        return [job.run() for job in jobs]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def gptq_model(
    model: nn.Module,
    qtype_for: Callable[[str, nn.Linear], str | None],
    ids: torch.Tensor,
    config: GPTQConfig,
    options: dict[str, Any],
    *,
    progress: bool = True,
    runner: Any = None,
) -> dict[str, str | None]:
    """GPTQ every Linear of `model`'s decoder layers in place (QuantLinear); `qtype_for(name,
    linear)` gives each one's qtype (None: keep it). Returns {module name: qtype}. Formats
    without an integer grid (f16, fp8) are rounded to nearest. `runner`: where the layers and
    solves run (default `LocalRunner()`)."""
    plan: dict[str, str | None] = {}
    runner = runner or LocalRunner()

    if config.true_sequential or config.asym_alpha > 0:
        raise QuantizeError(
            "gptq: true_sequential / asym_alpha run through "
            "methods.gptq_sequential.sequential_gptq_model (any runner)"
        )

    def process(i: int, where: str, layer: nn.Module, stats: InputStats) -> Callable[[], None]:
        new = gptq_layer(where, stats, qtype_for, config, options, plan, runner.solve)
        return lambda: swap_in(layer, new)

    runner.run_layers(model, ids, process, progress=progress, desc="gptq")
    return plan


def swap_in(layer: nn.Module, new: dict[str, nn.Module]) -> None:
    """Replace the layer's modules by name (run once the layer's outputs are computed)."""
    for nm, mod in new.items():
        _set(layer, nm, mod)


def gptq_layer(
    where: str,
    stats: InputStats,
    qtype_for: Callable[[str, nn.Linear], str | None],
    config: GPTQConfig,
    options: dict[str, Any],
    plan: dict[str, str | None],
    solve: Callable[[list[SolveJob]], list[tuple[QTensor, torch.Tensor]]] | None = None,
    *,
    groups: list[tuple[list[str], torch.Tensor, torch.Tensor | None]] | None = None,
    rest: bool = True,
) -> dict[str, nn.Module]:
    """GPTQ one decoder layer's Linears from its input statistics: each Linear's weight is set
    to its quantized values (so the layer's outputs are the quantized layer's) and the
    QuantLinears to swap in are returned by name; `plan` gets each Linear's qtype. The layer's
    solves are independent: `solve` runs them all (default: one after another, here).
    `groups`: [(names, Hessian, cross moment or None)] to solve instead of `stats.groups()`;
    `rest=False`: leave the Linears outside them alone (else those never called are rounded)."""
    new: dict[str, nn.Module] = {}
    seen = set()
    jobs: list[SolveJob] = []
    placed: list[tuple[list[str], list[nn.Linear]]] = []
    todo = groups if groups is not None else [(n, h, None) for n, h, _ in stats.groups()]
    for names, h, cross in todo:
        by_qtype: dict[str, list[str]] = {}
        for nm in names:
            seen.add(nm)
            lin = stats.linears[nm]
            q = plan[f"{where}.{nm}"] = qtype_for(f"{where}.{nm}", lin)
            if q is not None:
                by_qtype.setdefault(q, []).append(nm)
        for q, group in by_qtype.items():
            opts = format_options(q, options)
            if q not in SUPPORTED:
                for nm in group:
                    new[nm] = QuantLinear.from_linear(stats.linears[nm], q, **opts)
                continue
            lins = [stats.linears[nm] for nm in group]
            w = torch.cat([lin.weight.detach().to(torch.float32) for lin in lins])
            name = f"{where}.{'+'.join(group)}"
            jobs.append(SolveJob(w, h, q, config, name, opts, cross))
            placed.append((group, lins))
    results = (solve or LocalRunner().solve)(jobs)
    for (group, lins), (qt, values) in zip(placed, results, strict=True):
        r0 = 0
        for nm, lin in zip(group, lins, strict=True):
            r1 = r0 + lin.out_features
            lin.weight.data = values[r0:r1].to(lin.weight.dtype)
            new[nm] = QuantLinear.from_qtensor(row_slice(qt, r0, r1), lin.bias)
            r0 = r1
    for nm, lin in stats.linears.items() if rest else ():  # never called in the forward pass
        if nm not in seen and nm not in stats.group_of:
            q = plan[f"{where}.{nm}"] = qtype_for(f"{where}.{nm}", lin)
            if q is not None:
                new[nm] = QuantLinear.from_linear(lin, q, **format_options(q, options))
    return new
