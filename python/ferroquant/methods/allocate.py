"""Measured per-tensor allocation to a byte budget (what EXL2 does for its own format, here for
GGUF files that run wherever llama.cpp runs).

Score of a (tensor, qtype) pair: the second-order estimate of the loss increase when that tensor
alone is quantized to that qtype,

    score = 1/2 * sum_ij F_i * X_j * (W_ij - Q(W)_ij)^2

with X_j = E[x_j^2] the mean squared input of column j (the importance matrix, per token) and
F_i = E[g_i^2] the mean squared gradient of the calibration loss at output i (the diagonal
empirical Fisher). It is the first term of the Taylor expansion of the KL to the unquantized
model (whose Hessian is the Fisher) with inputs and output gradients taken as independent and
the off-diagonal terms dropped; unlike the plain imatrix-weighted error it puts every tensor on
the same scale (nats), so errors of a v projection, a down projection and the output head can be
traded against each other. The token embedding counts twice when it is tied: as the output head
(inputs = the final hidden states) and as the input lookup (row v weighted by how often token v
occurs, columns by the gradient at the embedding output).

Optimiser: a Lagrangian relaxation (each tensor picks argmin score + lambda * bytes; bisection on
lambda for the smallest total under the budget, which lands on the convex hull), then a greedy
fill of what budget is left with the upgrades of best score-per-byte that still fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..qtypes import IMATRIX_QTYPES, qtype_info
from ..tensor import dequantize, quantize

__all__ = [
    "CANDIDATES",
    "AllocationPlan",
    "Sensitivity",
    "TensorMeasure",
    "candidates_for",
    "measure_tensor",
    "model_fingerprint",
    "optimise",
]

# K-quants (rows of multiples of 256) and, for other rows, the legacy types llama.cpp falls back to
CANDIDATES_K = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
CANDIDATES_LEGACY = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")
CANDIDATES = tuple(dict.fromkeys(CANDIDATES_K + CANDIDATES_LEGACY))


def candidates_for(cols: int) -> tuple[str, ...]:
    """The candidate qtypes for rows of `cols` weights."""
    if cols % 256 == 0:
        return CANDIDATES_K
    return tuple(q for q in CANDIDATES_LEGACY if cols % qtype_info(q).block_size == 0)


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    info = qtype_info(qtype)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * (int(shape[-1]) // info.block_size) * info.type_size


@dataclass
class Sensitivity:
    """Per-tensor weights of the score: `inputs` X_j [cols] and `outputs` F_i [rows] (both means
    per token); an embedding used as an input lookup adds `row_weight` [rows] x `col_weight`
    [cols]."""

    inputs: np.ndarray | None = None
    outputs: np.ndarray | None = None
    row_weight: np.ndarray | None = None
    col_weight: np.ndarray | None = None

    def error(self, d2: np.ndarray) -> float:
        """1/2 sum F_i X_j d2_ij (+ the lookup term) for squared differences d2 [rows, cols]."""
        total = 0.0
        if self.inputs is not None and self.outputs is not None:
            total += float(self.outputs.astype(np.float64) @ (d2 @ self.inputs.astype(np.float64)))
        if self.row_weight is not None and self.col_weight is not None:
            rw = self.row_weight.astype(np.float64)
            total += float(rw @ (d2 @ self.col_weight.astype(np.float64)))
        return 0.5 * total


@dataclass
class TensorMeasure:
    """One tensor's options: {qtype: [bytes, score]}."""

    name: str
    shape: tuple[int, ...]
    options: dict[str, tuple[int, float]]


def measure_tensor(
    name: str,
    w: np.ndarray,
    sens: Sensitivity,
    importance: np.ndarray | None,
    qtypes: tuple[str, ...] | None = None,
) -> TensorMeasure:
    """Score every candidate qtype of the float32 weight `w` (quantized with the per-column
    `importance`, as the file will be)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    opts: dict[str, tuple[int, float]] = {}
    for q in qtypes or candidates_for(w.shape[-1]):
        imp = importance if q in IMATRIX_QTYPES else None
        d = dequantize(quantize(w, q, imp)) - w
        opts[q] = (tensor_bytes(w.shape, q), sens.error(d.astype(np.float64) ** 2))
    return TensorMeasure(name, tuple(int(s) for s in w.shape), opts)


def optimise(measures: list[TensorMeasure], budget: int) -> dict[str, str]:
    """One qtype per tensor minimising the summed score with summed bytes <= `budget`;
    ValueError stating both limits when the budget is out of reach."""
    lo = sum(min(b for b, _ in m.options.values()) for m in measures)
    hi = sum(max(b for b, _ in m.options.values()) for m in measures)
    if budget < lo or budget > hi:
        raise ValueError(
            f"target of {budget} tensor bytes is outside what the candidates can make: "
            f"smallest {lo} bytes, largest {hi} bytes"
        )

    def pick(lam: float) -> dict[str, str]:
        return {
            m.name: min(m.options, key=lambda q, m=m: m.options[q][1] + lam * m.options[q][0])
            for m in measures
        }

    def size(choice: dict[str, str]) -> int:
        return sum(m.options[choice[m.name]][0] for m in measures)

    a, b = 0.0, 1.0
    while size(pick(b)) > budget:
        b *= 4.0
        if b > 1e30:
            break
    if size(pick(a)) <= budget:
        choice = pick(a)
    else:
        for _ in range(100):
            mid = 0.5 * (a + b)
            if size(pick(mid)) <= budget:
                b = mid
            else:
                a = mid
        choice = pick(b)
    # greedy fill: the upgrade with the best score gain per byte that still fits, repeatedly
    used = size(choice)
    by_name = {m.name: m for m in measures}
    while True:
        best: tuple[float, str, str] | None = None
        for name, q in choice.items():
            nb, ns = by_name[name].options[q]
            for q2, (b2, s2) in by_name[name].options.items():
                extra = b2 - nb
                if extra > 0 and s2 < ns and used + extra <= budget:
                    gain = (ns - s2) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, q2)
        if best is None:
            break
        _, name, q2 = best
        used += by_name[name].options[q2][0] - by_name[name].options[choice[name]][0]
        choice[name] = q2
    return choice


def model_fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    """A hash of the model's quantizable tensor names and shapes (a plan belongs to one model)."""
    text = json.dumps(sorted((n, list(s)) for n, s in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class AllocationPlan:
    """What the allocator measured and chose: readable, saved as JSON, reusable (`--plan`)."""

    fingerprint: str
    metric: str
    budget_bytes: int
    tensors: list[TensorMeasure]
    chosen: dict[str, str]
    imatrix: str = ""
    calibration: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_score(self) -> float:
        return sum(t.options[self.chosen[t.name]][1] for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.options[self.chosen[t.name]][0] for t in self.tensors)

    def rows(self) -> list[tuple[str, str, float, float]]:
        """(tensor, qtype, bits per weight, score) per tensor."""
        out = []
        for t in self.tensors:
            q = self.chosen[t.name]
            n = int(np.prod(t.shape, dtype=np.int64))
            out.append((t.name, q, 8.0 * t.options[q][0] / n, t.options[q][1]))
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        from .._atomic import atomic_path

        d = asdict(self)
        d["tensors"] = [
            {"name": t.name, "shape": list(t.shape), "options": t.options} for t in self.tensors
        ]
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(d, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AllocationPlan:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            tensors = [
                TensorMeasure(
                    t["name"],
                    tuple(int(s) for s in t["shape"]),
                    {q: (int(b), float(s)) for q, (b, s) in t["options"].items()},
                )
                for t in d.pop("tensors")
            ]
            plan = cls(tensors=tensors, **d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an allocation plan ({e})") from None
        for t in plan.tensors:
            q = plan.chosen.get(t.name)
            if q not in t.options:
                raise ValueError(f"{path}: tensor {t.name}: chosen type {q!r} was not measured")
        return plan

    def check_model(self, shapes: dict[str, tuple[int, ...]], where: str) -> None:
        """ValueError naming the first tensor that differs when the plan is for another model."""
        mine = {t.name: t.shape for t in self.tensors}
        for n, s in shapes.items():
            if n not in mine:
                raise ValueError(f"{where}: the plan has no tensor {n} (a plan for another model?)")
            if tuple(mine[n]) != tuple(s):
                raise ValueError(
                    f"{where}: tensor {n} is {list(s)} in the model, {list(mine[n])} in the plan "
                    "(a plan for another model?)"
                )
        extra = sorted(set(mine) - set(shapes))
        if extra:
            raise ValueError(f"{where}: the plan's tensor {extra[0]} is not in the model")
