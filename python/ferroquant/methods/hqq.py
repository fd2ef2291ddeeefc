"""HQQ (half-quadratic quantization; Badri & Shaji 2023): calibration-free zero-point search.

For each group the solver minimises the lp-norm (p < 1) of the reconstruction error over the
zero point by half-quadratic splitting, as the `hqq` package's default solver does
(`hqq/core/optimize.py`, `optimize_weights_proximal_legacy`): with the inverse scale `s`,

    q = clamp(round(w * s + z), 0, maxq);  e = shrink_p(w - (q - z) / s);
    z = mean(q - (w - e) * s)              (per group)

where shrink_p(x) = sign(x) * relu(|x| - |x|^(p-1) / beta), with the package's early stop (the
whole tensor stops at the first step whose mean |error| does not improve). Vectorised over all
groups in torch. (Keeping each group's own best zero by mean |error| instead was measured
~1 % worse in relative Frobenius error: the L1 criterion is not the L2 one.)

Storage (the grouped integer formats, int{2,3,4}_g*, asymmetric): the format stores an integer
zero (GPTQ / AWQ checkpoints need one), so HQQ's float zero is rounded; rounding alone gives
back most of what the solver gained (measured: benches/RESULTS.md), so with `optimize_scale`
the scale is then re-solved for the integer zero by the same half-quadratic splitting
(s = <w - e, q - z> / <q - z, q - z>, fp16-rounded each step). Finally each group keeps,
of {HQQ's parameters, the format's round-to-nearest parameters}, the pair with the smaller
squared error in the format's exact decode arithmetic: so an HQQ tensor's squared error is
never above RTN's on the same format, group by group (the one invariant we state: the lp
objective alone does not bound the L2 error).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..qtypes import gint_params, qtype_info
from ..tensor import QTensor, QuantizeError, quantize


@dataclass(frozen=True)
class HQQConfig:
    """The solver's options; defaults are the `hqq` package's (0.2.8): lp_norm 0.7, beta 10,
    kappa 1.01 (beta grows by kappa each iteration, as in the paper; the package's legacy
    solver keeps beta fixed: kappa=1.0 reproduces it), 20 iterations, early stop per group."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    optimize_scale: bool = True  # re-solve the scale after the zero is rounded to an integer

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


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    a = x.abs()
    if p == 1.0:
        return torch.sign(x) * (a - 1.0 / beta).clamp_min_(0.0)
    # |x|^(p-1) is infinite at 0: shrinking a zero error gives 0 either way
    return torch.sign(x) * (a - a.clamp_min(1e-30).pow(p - 1.0) / beta).clamp_min_(0.0)


def solve_zero(w: torch.Tensor, bits: int, cfg: HQQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's float parameters of groups `w` [groups, g] (float32): (inverse scale, zero) [groups,
    1], initialised as the package does (min/max, zero = -min * scale); stops, as the package
    does, at the first step whose mean |error| over the whole tensor does not improve."""
    maxq = float((1 << bits) - 1)
    mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    den = mx - mn
    s = torch.where(den.abs() <= 1e-4, torch.ones_like(den), maxq / den).clamp(max=2e4)
    z = -mn * s
    best, beta = float("inf"), cfg.beta
    for _ in range(cfg.iters):  # the package's arithmetic, operation for operation
        q = torch.round(w * s + z).clamp_(0.0, maxq)
        err = w - (q - z) / s
        a = err.abs()
        current = float(a.mean())
        # shrink_p(x) is 0 wherever |x|^(2-p) < 1/beta: when every error is below that (with a
        # margin far above pow's rounding), skip it; w - 0 is w, so the result is bit-identical
        if float(a.max()) < 0.999 * beta ** (-1.0 / (2.0 - cfg.lp_norm)):
            z = torch.mean(q - w * s, dim=1, keepdim=True)
        else:
            z = torch.mean(q - (w - _shrink(err, beta, cfg.lp_norm)) * s, dim=1, keepdim=True)
        if current < best:
            best = current
        elif cfg.early_stop:
            break  # like the package: keep the zero this step computed
        beta *= cfg.kappa
    return s, z


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The nearest level of the grid scale * (level - zero) (integer zero, f32 arithmetic)."""
    return (torch.round(w / scale) + zero).clamp_(0, maxq)


def _sq_err(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return ((_codes(w, scale, zero, maxq) - zero) * scale - w).pow(2).sum(1, keepdim=True)


def _refine_scale(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, cfg: HQQConfig
) -> torch.Tensor:
    """The scale re-solved for a fixed integer zero by the same splitting (fp16 each step); each
    group keeps its best scale by squared error. One rounding pass a step: the codes of the
    current scale serve both its error and the next update."""
    best_s = scale
    best_e = torch.full_like(scale, float("inf"))
    beta, total = cfg.beta, float("inf")
    for _ in range(cfg.iters + 1):
        d = _codes(w, scale, zero, maxq) - zero
        r = w - d * scale
        err = r.pow(2).sum(1, keepdim=True)
        better = err < best_e
        best_e, best_s = torch.where(better, err, best_e), torch.where(better, scale, best_s)
        now = float(best_e.sum())
        if cfg.early_stop and not now < total:
            break
        total = now
        small = float(r.abs().max()) < 0.999 * beta ** (-1.0 / (2.0 - cfg.lp_norm))
        e = torch.zeros_like(r) if small else _shrink(r, beta, cfg.lp_norm)  # as in solve_zero
        s_new = ((w - e) * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True).clamp_min(1e-12)
        scale = torch.where(s_new > 0, s_new, scale).half().float()
        beta *= cfg.kappa
    return best_s


SUPPORTED_HQQ = (
    "the asymmetric grouped integer qtypes (int2/int3/int4 _g32/_g64/_g128/_gch), q4_1, q5_1"
)
_LEGACY_MIN = {"q4_1": 4, "q5_1": 5}  # ggml blocks of 32: fp16 d, fp16 m, codes; x = d * q + m


def _hqq_legacy(w_np: np.ndarray, qtype: str, cfg: HQQConfig) -> QTensor:
    """q4_1 / q5_1: HQQ's float zero is native here (the block minimum m = -z d, fp16), so the
    solver's result is stored as it is: d = fp16(1 / s), m = fp16(-z / s), codes the nearest
    levels of the stored grid; each block keeps HQQ's bytes or ggml's RTN bytes, whichever
    decodes with the smaller squared error."""
    from .grid import _layout, pack_levels

    bits = _LEGACY_MIN[qtype]
    maxq = (1 << bits) - 1
    rtn = quantize(w_np, qtype)
    lay = _layout(qtype, 32, w_np.shape[1])
    w = torch.from_numpy(w_np).reshape(-1, 32)
    inv, zf = solve_zero(w, bits, cfg)
    d = (1.0 / inv).half()
    m = (-zf / inv).half()
    d32, m32 = d.float(), m.float()
    safe = torch.where(d32 > 0, d32, torch.ones_like(d32))
    codes = torch.round((w - m32) / safe).clamp_(0, maxq)
    codes = torch.where(d32 > 0, codes, torch.zeros_like(codes))
    data = np.zeros((w.shape[0], lay.nbytes), np.uint8)
    data[:, 0:2] = d.numpy().view(np.uint8).reshape(-1, 2)
    data[:, 2:4] = m.numpy().view(np.uint8).reshape(-1, 2)
    data = pack_levels(lay, data, codes.to(torch.int64).numpy())
    ours = QTensor(qtype, tuple(w_np.shape), data.reshape(-1), 32)
    ref = np.asarray(rtn.data, np.uint8).reshape(-1, lay.nbytes)
    flat = w_np.reshape(-1, 32).astype(np.float64)
    e_ours = ((np.asarray(_dequant(ours)).reshape(-1, 32) - flat) ** 2).sum(1)
    e_rtn = ((np.asarray(_dequant(rtn)).reshape(-1, 32) - flat) ** 2).sum(1)
    data = np.where((e_ours < e_rtn)[:, None], data, ref)
    return QTensor(qtype, tuple(w_np.shape), np.ascontiguousarray(data).reshape(-1), 32)


def _dequant(qt: QTensor) -> np.ndarray:
    from ..tensor import dequantize

    return dequantize(qt)


def hqq_quantize(weight: Any, qtype: str, config: HQQConfig | None = None) -> QTensor:
    """`weight` [rows, cols] (numpy or torch) as an HQQ-optimised tensor of `qtype` (an
    asymmetric grouped integer qtype, q4_1 or q5_1): an ordinary tensor of the format."""
    from ..models.packed_int import _qtensor

    cfg = config or HQQConfig()
    name = qtype_info(qtype).name
    gi = gint_params(name)
    if name not in _LEGACY_MIN and (gi is None or gi.sym):
        raise QuantizeError(
            f"method hqq optimises zero points: {name} has none; use {SUPPORTED_HQQ}"
        )
    w_np = weight.detach().cpu().float().numpy() if hasattr(weight, "detach") else weight
    w_np = np.ascontiguousarray(np.asarray(w_np, np.float32))
    if w_np.ndim != 2:
        raise QuantizeError(f"hqq quantizes 2-D weights, got shape {w_np.shape}")
    if not np.isfinite(w_np).all():
        raise QuantizeError("hqq: the weight has non-finite values")
    if name in _LEGACY_MIN:
        if w_np.shape[1] % 32:
            raise QuantizeError(f"{name}: rows of {w_np.shape[1]} are not whole blocks of 32")
        return _hqq_legacy(w_np, name, cfg)
    rtn = quantize(w_np, name)  # the format's own parameters (and its shape checks)
    rows, cols = w_np.shape
    group = rtn.block_size
    n = cols // group
    maxq = (1 << gi.bits) - 1
    st = np.asarray(rtn.stats, np.float32).reshape(rows, 2, n)
    r_scale = torch.from_numpy(st[:, 0].reshape(-1, 1).copy())
    r_zero = torch.from_numpy(st[:, 1].reshape(-1, 1).copy())
    w = torch.from_numpy(w_np).reshape(-1, group)
    inv, zf = solve_zero(w, gi.bits, cfg)
    scale = (1.0 / inv).half().float()
    scale = torch.where(scale > 0, scale, r_scale)  # fp16 underflow: keep the format's scale
    zero = torch.round(zf).clamp_(0, maxq)
    if cfg.optimize_scale:
        scale = _refine_scale(w, scale, zero, maxq, cfg)
    keep = _sq_err(w, scale, zero, maxq) < _sq_err(w, r_scale, r_zero, maxq)
    scale, zero = torch.where(keep, scale, r_scale), torch.where(keep, zero, r_zero)
    codes = _codes(w, scale, zero, maxq).to(torch.int64).reshape(rows, cols).numpy()
    return _qtensor(codes, scale.reshape(rows, n).numpy(), zero.reshape(rows, n).numpy(),
                    gi.bits, group if "_gch" not in name else -1, False)  # fmt: skip
