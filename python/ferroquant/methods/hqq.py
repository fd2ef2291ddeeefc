"""HQQ (half-quadratic quantization; Badri & Shaji 2023): calibration-free zero-point search.

The solver and the storage run in Rust (`rust/core/src/hqq/`: the module comments define the
arithmetic): per group the lp-norm (p < 1) reconstruction error is minimised over the zero point
by half-quadratic splitting, as the `hqq` package's default solver does (`hqq/core/optimize.py`,
`optimize_weights_proximal_legacy`), with the inverse scale `s`:

    q = clamp(round(w * s + z), 0, maxq);  e = shrink_p(w - (q - z) / s);
    z = mean(q - (w - e) * s)              (per group)

where shrink_p(x) = sign(x) * relu(|x| - |x|^(p-1) / beta), with the package's early stop (the
whole tensor stops at the first step whose mean |error| does not improve). The fast path runs
on group-major blocks (16 groups side by side, one per vector lane: one fused pass per block and
step, blocks in parallel); the result does not depend on the thread count, and it is
bit-identical to the scalar reference (`_native.hqq_solve(reference=True)`).

Storage (`hqq/store.rs`): grouped integers (int{2,3,4}_g*, integer zero): a joint search over
the integer zero (HQQ's rounded and its neighbour on the float zero's side) and the fp16 scale
(5 factors around 1/s, the best refitted by least squares) in squared error, group-major like
the solver and bit-identical to its scalar reference; q4_1 / q5_1: HQQ's float zero is the
block minimum; q2_k / q4_k / q5_k: the solver per sub-block, the sub-block scales and mins
then quantized the format's way. Every block keeps, of HQQ's bytes and the format's
round-to-nearest bytes, the ones with the smaller squared error: never worse than RTN, block by
block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import _native
from ..qtypes import qtype_info
from ..tensor import QTensor, QuantizeError


@dataclass(frozen=True)
class HQQConfig:
    """The solver's options; defaults are the `hqq` package's (0.2.8): lp_norm 0.7, beta 10,
    kappa 1.01 (beta grows by kappa each iteration, as in the paper; the package's legacy
    solver keeps beta fixed: kappa=1.0 reproduces it), 20 iterations, early stop."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.lp_norm <= 1.0:
            raise QuantizeError(f"hqq lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1.0 or self.iters < 1:
            raise QuantizeError(
                f"hqq needs beta > 0, kappa >= 1, iters >= 1; got beta={self.beta}, "
                f"kappa={self.kappa}, iters={self.iters}"
            )

    def describe(self) -> str:
        return "hqq(" + ", ".join(f"{k}={v}" for k, v in asdict(self).items()) + ")"


SUPPORTED_HQQ = (
    "the asymmetric grouped integer qtypes (int2/int3/int4 _g32/_g64/_g128/_gch), their "
    "float-zero variants (int2/int3/int4 _g32/_g64/_g128 _fz), q4_1, q5_1, q2_k, q4_k, q5_k"
)


def _as_f32_2d(weight: Any) -> np.ndarray:
    w = weight.detach().cpu().float().numpy() if hasattr(weight, "detach") else weight
    return np.ascontiguousarray(np.asarray(w, np.float32))


def solve_zero(
    w: Any, bits: int, cfg: HQQConfig | None = None, *, reference: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """HQQ's float parameters of groups `w` [groups, g]: (inverse scale, zero) [groups, 1]
    float32, `w ~ (q - zero) / inverse scale`. `reference`: the scalar reference."""
    cfg = cfg or HQQConfig()
    g = _as_f32_2d(w)
    if g.ndim != 2:
        raise QuantizeError(f"hqq solve_zero takes groups [groups, size], got shape {g.shape}")
    inv, zero, _ = _native.hqq_solve(g, g.shape[1], bits, reference=reference, **asdict(cfg))
    return inv.reshape(-1, 1), zero.reshape(-1, 1)


def has_zero_point(qtype: str) -> bool:
    """Whether HQQ can optimise `qtype` (a format with a zero point / minimum)."""
    try:
        name = qtype_info(qtype).name
    except (QuantizeError, ValueError):
        return False
    if name in ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k"):
        return True
    return name.startswith("int") and "_g" in name and not name.endswith("_sym")


def hqq_quantize(weight: Any, qtype: str, config: HQQConfig | None = None) -> QTensor:
    """`weight` [rows, cols] (numpy or torch) as an HQQ-optimised tensor of `qtype` (see
    SUPPORTED_HQQ): an ordinary tensor of the format."""
    cfg = config or HQQConfig()
    name = qtype_info(qtype).name
    if not has_zero_point(name):
        raise QuantizeError(
            f"method hqq optimises zero points: {name} has none; use {SUPPORTED_HQQ}"
        )
    w = _as_f32_2d(weight)
    if w.ndim != 2:
        raise QuantizeError(f"hqq quantizes 2-D weights, got shape {w.shape}")
    out = _native.hqq_quantize(w, name, **asdict(cfg))
    return QTensor(
        qtype=name,
        shape=tuple(int(s) for s in w.shape),
        data=out["data"],
        block_size=int(out["block_size"]),
        stats=out["stats"],
    )
