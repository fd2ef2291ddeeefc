"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), into any format `grid.FormatGrid` knows.

For a Linear with weight W [rows, cols] and the second moment of its inputs H = 2/n sum x x^T:
columns are quantized one at a time and each column's error, scaled by the inverse Hessian's
Cholesky factor, is pushed onto the columns not yet quantized (lazy batches of `block_size`
columns, the rest updated once per batch). Dead inputs (H_ii = 0) get H_ii = 1 and weight 0;
damping adds `damp` x mean(diag H) to the diagonal, multiplied by 10 with a warning while the
Cholesky factorization fails. With `act_order` the columns go by decreasing H_ii, and every
block's parameters are fixed up front from the original weights ("static groups"); without it
a block's parameters are fixed when GPTQ reaches its first column, from the weights as updated
so far. The codes are chosen with the format's own rounding on those parameters, and the result
is an ordinary tensor of the format.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..tensor import QTensor, QuantizeError
from . import gptq_native
from .grid import Blocks, FormatGrid


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's options, with the paper's / the reference implementation's defaults.

    damp: fraction of the mean Hessian diagonal added to the diagonal (paper: 0.01).
    act_order: quantize columns by decreasing H_ii (GPTQModel's desc_act; static groups).
    block_size: columns per lazy batch update (paper: 128), rounded up to whole format blocks.
    n_samples, seq_len: calibration windows of consecutive tokens (128 x 512, as the paper's
      128 random 2048-token segments scaled to a 2048-context model's common setting).
    scale_search, scale_shrink: when a block's parameters are fixed as GPTQ reaches it (natural
      column order), for formats whose quantizer takes a block's scale from its absmax (q4_0,
      q5_0, q8_0, q4_1, q5_1, nf4, fp4, int8, the grouped integers), they are the format's own
      for the block's current weights times f, f among scale_search + 1 steps from 1.0 down to
      1 - scale_shrink, the one with the least H_ii-weighted rounding error (GPTQ's "mse" grid
      option, weighted by the Hessian's diagonal). 0: absmax, as RTN. With act_order's static
      groups the parameters are always the format's own on the original weights (the search
      measured worse there on SmolLM2: the narrower range leaves the error feedback less room).
    true_sequential: within a decoder layer, each group of Linears sharing an input (q/k/v, o,
      gate/up, down) is solved in forward order on the Hessian of its inputs as computed by the
      layer with the groups before it already quantized (the GPTQ paper's "true sequential";
      GPTQModel's default). At most 8 windows on this machine: all inside the layer's one
      forward pass (`gptq_onepass`), the cheapest scheme; plain GPTQ needs two.
    asym_alpha: asymmetric calibration (GPTAQ, Li et al. 2025): the target is the float model's
      output W x_fp where x_fp is the float model's input of the Linear, not the quantized
      model's x. GPTQ then solves for W + asym_alpha * W D H^-1 (D = 2/n sum (x_fp - x) x^T, the
      least-squares correction of the mismatch, shrunk by alpha as GPTAQ's alpha = 0.25).
      0: plain GPTQ (the target is W x). Default 0.25 (session 10, SmolLM2 q4_0 at 32 x 512
      calibration tokens: 60 % of RTN's perplexity increase removed against plain GPTQ's 28 %,
      at about 2.2x its CPU time; RESULTS.md).
    """

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    n_samples: int = 128
    seq_len: int = 512
    scale_search: int = 10
    scale_shrink: float = 0.3
    true_sequential: bool = False
    asym_alpha: float = 0.25

    def scale_factors(self) -> tuple[float, ...]:
        """The range factors the block-scale search tries: 1.0 down to 1 - scale_shrink."""
        n = self.scale_search
        return tuple(1.0 - self.scale_shrink * i / n for i in range(n + 1)) if n > 0 else ()

    def describe(self) -> str:
        return "gptq(" + ", ".join(f"{k}={v}" for k, v in asdict(self).items()) + ")"


def _inverse_cholesky(
    h: torch.Tensor,
    damp: float,
    name: str,
    dtype: torch.dtype = torch.float64,
    diag: torch.Tensor | None = None,
    flipped: bool = False,
    ldl: bool = False,
    owned: bool = False,
) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, float32; damping x10 on failure. `ldl`
    (float32 only): the LDL form's update matrix instead (`_ldl_update`), no inverse. `owned`:
    `h` is the caller's scratch copy in `dtype`, damped in place (no copy: the factorizations
    never write their input, and each try sets the whole diagonal). The
    factorizations run in `dtype`: float64 (the reference) or float32 (as the GPTQ paper's code
    and GPTQModel / llm-compressor run them: `gptq_native.CHOLESKY_DTYPE`). The damping is added
    in float64 either way: to `diag` (H's float64 diagonal) where given, so that `h` may come
    already rounded to `dtype` (the same values: only the diagonal is not rounded first).
    `flipped` (float32 only): `h` and `diag` come in reversed order, J H J, the form the float32
    factorization starts from (`_upper_inverse_factor`), so that no flipped copy is made."""
    if diag is None:
        h = h.to(torch.float64)
        diag = torch.diagonal(h)
    diag = diag.to(torch.float64)
    # the mean in H's order (a reversed sum may differ in its last bit)
    mean_diag = float((diag.flip(0) if flipped else diag).mean())
    frac = damp
    for _ in range(6):
        # the damping on the diagonal only (no n x n identity: 1.6 GB at 14336), added in
        # float64 and rounded with the rest: a float32 copy takes the damped diagonal's values
        if owned and h.dtype == dtype:
            hd = h
        else:
            hd = h.clone() if dtype == torch.float64 or h.dtype == dtype else h.to(dtype)
        hd.diagonal().copy_(diag + frac * mean_diag)
        upper = _ldl_update(hd, flipped) if ldl else _upper_inverse_factor(hd, flipped)
        del hd
        if upper is not None:
            return upper.to(torch.float32)
        new = frac * 10 if frac > 0 else 1e-6
        warnings.warn(
            f"gptq: Cholesky failed for {name} with damping {frac:g} x mean diag; "
            f"retrying with {new:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        frac = new
    raise QuantizeError(f"gptq: the Hessian of {name} is not positive definite even with damping")


def _upper_inverse_factor(hd: torch.Tensor, flipped: bool = False) -> torch.Tensor | None:
    """Upper U with U^T U = hd^-1 (None when a factorization fails). float64 (the reference):
    Cholesky, its inverse, Cholesky of that. float32: one Cholesky of the flipped matrix, J hd J
    = L L^T (J reverses the order), and U = J L^-1 J (then U^T U = J L^-T L^-1 J = hd^-1, and U
    is upper with a positive diagonal: the same factor), L^-1 by `_lower_inverse`'s GEMMs: 1.6x
    faster at 1536 than the three factorizations on one core, within the tested tolerance.
    `flipped`: `hd` is given as J hd J already (float32 only)."""
    if hd.dtype == torch.float64:
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) != 0:
            return None
        hinv = torch.cholesky_inverse(lower)
        del lower  # one n x n float64 less at the peak (1.6 GB for a 14336-wide input)
        upper, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
        return upper if int(info2) == 0 else None
    lower, info = torch.linalg.cholesky_ex(hd if flipped else hd.flip(0, 1))
    if int(info) != 0:
        return None
    return _lower_inverse(lower).flip(0, 1)


def _ldl_update(hd: torch.Tensor, flipped: bool = False) -> torch.Tensor | None:
    """-V diag(V)^-1 for the upper V with V V^T = hd (float32; None when the factorization
    fails): one Cholesky of the flipped matrix, J hd J = L L^T, V = J L J. GPTQ's column loop
    in the LDL form (QuIP's LDLQ; `gptq_native`, the loops' `ldl`) pushes each column's error
    against its *original* weights, w_orig_i - q_i, onto column j with this matrix's (i, j):
    the same algorithm as the inverse factor's U = V^-1 (W - Q = E U, E = (W - Q) V), without
    the triangular inverse (half the factor's work, and none of the inverse's rounding: the
    factor carries one Cholesky's backward error). `flipped`: `hd` is J hd J already."""
    lower, info = torch.linalg.cholesky_ex(hd if flipped else hd.flip(0, 1))
    if int(info) != 0:
        return None
    vdiag = lower.diagonal().flip(0).neg()  # V_jj = L[n-1-j, n-1-j], negated
    return lower.flip(0, 1).div_(vdiag)  # column j of V over -V_jj


def _lower_inverse(lower: torch.Tensor, base: int = 128) -> torch.Tensor:
    """The inverse of a lower-triangular matrix with a nonzero diagonal, by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]] (the off-diagonal block two GEMMs),
    triangular solves against the identity below `base` rows."""
    n = lower.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    k = n // 2
    a = _lower_inverse(lower[:k, :k], base)
    c = _lower_inverse(lower[k:, k:], base)
    out = torch.zeros_like(lower)
    out[:k, :k] = a
    out[k:, k:] = c
    out[k:, :k] = -(c @ (lower[k:, :k] @ a))
    return out


def asymmetric_target(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor,
    alpha: float,
    damp: float,
    name: str,
) -> torch.Tensor:
    """W + alpha * W D (H + damping)^-1, float32: the float weights whose output on the
    quantized model's inputs x best matches (alpha = 1: least squares) the float model's W x_fp,
    since sum |W x_fp - Q x|^2 = sum |(W + W D H^-1 - Q) x|^2 + const. The damping is GPTQ's
    (`damp` x mean diag H), which keeps the correction small along directions x barely spans."""
    cols = weight.shape[1]
    if cross.shape != (cols, cols):
        raise QuantizeError(f"{name}: cross moment of shape {tuple(cross.shape)} for {cols} inputs")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return weight
    w = weight.detach().to(torch.float64)
    # (H^-1 D^T)^T = D H^-1 (H symmetric)
    corr = torch.cholesky_solve(cross.detach().to(torch.float64).t().contiguous(), lower).t()
    return (w + alpha * (w @ corr)).to(torch.float32)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qtype: str,
    config: GPTQConfig | None = None,
    *,
    name: str = "weight",
    propagate: bool = True,
    cross: torch.Tensor | None = None,
    **options: Any,
) -> tuple[QTensor, torch.Tensor]:
    """GPTQ of `weight` [rows, cols] with `hessian` [cols, cols] into `qtype`.

    Returns (the quantized tensor, its dequantized values as float32 [rows, cols]); the values
    equal `ferroquant.dequantize` of the tensor bit for bit. `propagate=False` skips the error
    feedback (then each column is rounded as the format rounds it). `options` are
    `ferroquant.quantize`'s (block_size, scale_mode). `cross`: D = 2/n sum (x_fp - x) x^T
    [cols, cols] for the asymmetric target (`GPTQConfig.asym_alpha`). The column loop runs on
    one torch thread: its operations are small, and OpenMP's barriers cost more than they save
    (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config or GPTQConfig()
        if cross is not None and cfg.asym_alpha > 0:
            weight = asymmetric_target(weight, hessian, cross, cfg.asym_alpha, cfg.damp, name)
        return _gptq(weight, hessian, qtype, cfg, name, propagate, options)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qtype: str,
    cfg: GPTQConfig,
    name: str,
    propagate: bool,
    options: dict[str, Any],
) -> tuple[QTensor, torch.Tensor]:
    w = weight.detach().to(torch.float32)  # only read below, but for dead columns (a copy)
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise QuantizeError(f"{name}: Hessian of shape {tuple(hessian.shape)} for {cols} inputs")
    grid = FormatGrid(qtype, (rows, cols), **options)
    native = gptq_native.available()
    chol_dtype = gptq_native.CHOLESKY_DTYPE if native else torch.float64
    # H's float64 diagonal with the dead inputs' set to 1; the off-diagonal part is only read
    # (permuted once, in the factorization's dtype: the values the float64 copy would round to)
    hdiag64 = torch.diagonal(hessian.detach()).to(torch.float64).clone()
    dead = hdiag64 == 0
    if bool(dead.any()):
        hdiag64[dead] = 1.0
        w = w.clone()
        w[:, dead] = 0.0
    fb = grid.block
    factors = cfg.scale_factors() if grid.searchable else ()
    hdiag = hdiag64.to(torch.float32)

    def block_params(values: torch.Tensor, c0: int) -> Blocks:
        if not factors:
            return grid.params(values)
        return grid.searched_params(values, hdiag[c0 : c0 + values.shape[1]], factors)

    static = cfg.act_order or fb > max(cfg.block_size, 256)
    if static:
        perm = torch.argsort(hdiag64, descending=True, stable=True)
        if not cfg.act_order:
            perm = torch.arange(cols)
        # every block's parameters from the original weights, by the format's own quantizer: a
        # searched (narrower) range leaves the error feedback less room and measured worse here
        params = grid.params(w)
        lazy = cfg.block_size
    else:
        perm = torch.arange(cols)
        params = None
        lazy = math.ceil(cfg.block_size / fb) * fb
    # H[perm][:, perm] in the factorization's dtype (index_select twice: 2x faster); the float32
    # factorization starts from the reversed order J H J, so that is the order taken there
    flipped = chol_dtype == torch.float32
    order = perm.flip(0) if flipped else perm
    h = hessian.detach()
    if not torch.equal(order, torch.arange(cols)):
        if native and chol_dtype == torch.float32:  # converted while permuted: one pass
            h = gptq_native.permuted_f32(h, order)
        else:
            h = h.to(chol_dtype).index_select(0, order).index_select(1, order)
        owned = True
    else:
        h = h.to(chol_dtype)
        owned = h.dtype != hessian.dtype  # a converted copy: damped in place, else a copy is
    # the float32 factor in the LDL form where this build's loop has it (no triangular
    # inverse), with static groups only: the two forms agree on each column's weights when it
    # is rounded, not on the later columns' partial updates, and parameters fixed as GPTQ
    # reaches a block read those (the inverse factor's are the textbook GPTQ's)
    ldl = static and flipped and gptq_native.LDL_FORM and gptq_native.has_ldl()
    hinv = _inverse_cholesky(h, cfg.damp, name, chol_dtype, diag=hdiag64[order], flipped=flipped,
                             ldl=ldl, owned=owned)  # fmt: skip
    # the loop runs on W^T [cols, rows] (permuted): a column is one contiguous vector, its
    # rank-1 update an in-place update of contiguous rows, its codes one row of a buffer
    wt = gptq_native.solve_order(w, perm) if native else w.t()[perm].contiguous()
    # every row is written by the loop (every column is rounded): no zero fill
    # every format's levels fit a byte (at most 256): a quarter of int64's memory traffic in
    # the loop and in the packing
    levels_t = torch.empty((cols, rows), dtype=torch.uint8)
    values_t = torch.empty((cols, rows), dtype=torch.float32)
    loop = gptq_native.column_loop if native else _column_loop
    blocks = loop(
        grid,
        wt,
        hinv,
        levels_t,
        values_t,
        static=static,
        params=params,
        perm=perm,
        lazy=lazy,
        block_params=block_params,
        propagate=propagate,
        ldl=ldl,
    )
    inv_perm = torch.argsort(perm)
    if native:
        values = gptq_native.natural_order(values_t, inv_perm)
    else:
        values = values_t.index_select(0, inv_perm).t().contiguous()
    done = [params] if static else blocks
    if native and gptq_native.packs():  # packed from the solve's order, in one pass
        return grid.qtensor_solved(done, levels_t.numpy(), perm.numpy()), values
    levels = levels_t.index_select(0, inv_perm).t().contiguous()
    return grid.qtensor(done, levels.numpy()), values


def _column_loop(
    grid: FormatGrid,
    wt: torch.Tensor,
    hinv: torch.Tensor,
    levels_t: torch.Tensor,
    values_t: torch.Tensor,
    *,
    static: bool,
    params: Blocks | None,
    perm: torch.Tensor,
    lazy: int,
    block_params: Callable[[torch.Tensor, int], Blocks],
    propagate: bool,
    ldl: bool = False,
) -> list[Blocks]:
    """The reference column loop (Python and torch), one column at a time: fills `levels_t` /
    `values_t` ([cols, rows], permuted order), updates `wt` in place and returns the blocks'
    parameters fixed on the way (natural order; empty with static groups).
    `gptq_native.column_loop` is its compiled twin. `ldl`: `hinv` is `_ldl_update`'s matrix and
    each column's error is its original weights' (a copy of `wt` on entry) minus its values,
    not divided by the diagonal."""
    cols = wt.shape[0]
    orig = wt.clone() if ldl else None
    fb = grid.block
    blocks: list[Blocks] = []
    # static parameters transposed once (per lazy block where the format keeps a table of
    # values per weight: the affine K-quants' [rows, cols, levels] is not worth a second copy)
    per_block = static and params.grid is not None
    cur = grid.columns(params, perm) if static and not per_block else None
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        err1 = orig[i1:i2] if orig is not None else torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(h1).tolist()
        lev1 = levels_t[i1:i2]
        val1 = values_t[i1:i2]
        if per_block:
            cur = grid.columns(params, perm[i1:i2])
        for i in range(i2 - i1):
            if not static and i % fb == 0:
                blk = block_params(w1[i : i + fb].t(), i1 + i)
                blocks.append(blk)
                cur = grid.columns(blk, slice(None))
            col = w1[i]
            lev, q = cur.quantize(i if per_block else i1 + i if static else i % fb, col)
            lev1[i] = lev
            val1[i] = q
            if not propagate:
                continue
            e = err1[i]
            if ldl:
                e.sub_(q)
            else:
                torch.sub(col, q, out=e)
                e.div_(diag[i])
            if i + 1 < i2 - i1:
                # w_j - (h_ij * e): two roundings, the same on every CPU (torch's addr_ fuses
                # them in its vector body only, so its bits depend on the vector width)
                w1[i + 1 :].sub_(torch.outer(h1[i, i + 1 :], e))
        if propagate and i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    return blocks


def layer_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the calibration-weighted output error GPTQ minimises."""
    d = w.to(torch.float64) - q.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, h.to(torch.float64), d))
