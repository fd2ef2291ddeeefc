//! GPTQ's column loop (Frantar et al. 2022) inside one lazy batch: the compiled twin of the
//! Python loop in `python/ferroquant/methods/gptq.py` (the reference).
//!
//! The batch is `n` consecutive columns of the (permuted) weight, stored transposed: `w` is
//! `[n, rows]`, one contiguous vector a column. For each column `i` in `start..end`: round it
//! with the format's own rule on its block's parameters (`rounding`), then
//! `e = (w_i - q_i) / hinv[i, i]` and, for every later column `j` of the batch,
//! `w_j -= hinv[i, j] * e` (`hinv`: the batch's `[n, n]` block of the upper Cholesky factor of
//! the inverse Hessian). The update of the columns after the batch (one GEMM) and the choice of
//! block parameters stay in Python: they are where the format's quantizer and the BLAS live.
//!
//! **The LDL form** (`Batch::from_original`, QuIP's LDLQ, the same algorithm): with
//! `hinv` = -V diag(V)^-1 for V upper with V V^T = H (V = J L J, J H J = L L^T: no inverse),
//! `err` holding the columns' *original* weights on entry, `e = w_orig - q` and the same
//! `w_j -= hinv[i, j] * e`: W - Q = E U with U = V^-1 gives w_j's update
//! sum_k (w_orig_k - q_k) V_kj / V_jj. The float32 factor then carries one Cholesky's rounding
//! and no triangular inverse's.
//!
//! **Numerics.** f32, in the reference's operation order: `e = (w - q) / d` (torch's `sub` then
//! `div_`), and `w_j = w_j - (h_ij * e)` (the reference's `outer` then `sub_`: a product, then a
//! difference, two roundings; no FMA: Rust never contracts). Each weight's update is independent of the others, so the
//! result is the reference's bit for bit, whatever the vector width; tests in Python compare
//! the stored bytes of both loops on every format.

pub mod layout;
pub mod pack;
pub mod rounding;

pub use layout::{gather_transpose, permute_to_f32, Gather};
pub use pack::{pack_codes, BitPlan};
pub use rounding::{ColumnParams, Rule};

use crate::error::{Error, Result};

/// One lazy batch of GPTQ, transposed: every buffer is `[n, rows]` except `hinv` (`[n, n]`).
pub struct Batch<'a> {
    pub rows: usize,
    /// the batch's weights, updated in place
    pub w: &'a mut [f32],
    /// the batch's block of the inverse Hessian's upper Cholesky factor
    pub hinv: &'a [f32],
    /// each column's scaled error (for the update of the later batches); in the LDL form
    /// (`from_original`) the columns' original weights on entry, each replaced by `w_orig - q`
    pub err: &'a mut [f32],
    /// each weight's level (every format's fit a byte: `rounding::BYTE_LEVELS`)
    pub levels: &'a mut [u8],
    pub values: &'a mut [f32],
    /// the LDL form (module comment): `e = err - q` (err: the original weights), no division
    pub from_original: bool,
}

impl Batch<'_> {
    fn columns(&self) -> Result<usize> {
        let rows = self.rows;
        let n = self.w.len().checked_div(rows).unwrap_or(0);
        let ok = rows > 0
            && self.w.len() == n * rows
            && self.err.len() == n * rows
            && self.levels.len() == n * rows
            && self.values.len() == n * rows
            && self.hinv.len() == n * n;
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "gptq: batch buffers of {} / {} / {} / {} values and a {}-value inverse Hessian \
                 block do not form n columns of {rows} rows",
                self.w.len(),
                self.err.len(),
                self.levels.len(),
                self.values.len(),
                self.hinv.len()
            )));
        }
        Ok(n)
    }
}

/// Quantizes columns `start..end` of the batch with `rule` (column `i` reads `params` column
/// `i - start`, or `params.map[i - start]`) and, if `propagate`, pushes each column's error
/// onto the batch's later columns. Runs the AVX-512 build of the loop where the CPU has it
/// (`cpu::has_avx512`), else the portable build: the same source, the same bits.
pub fn solve_columns(
    batch: &mut Batch,
    start: usize,
    end: usize,
    rule: &Rule,
    params: &ColumnParams,
    propagate: bool,
) -> Result<()> {
    let n = check(batch, start, end, rule, params)?;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512 F/BW/VL were detected (`has_avx512`); the shapes were checked.
        unsafe { solve_avx512(batch, n, start, end, rule, params, propagate) };
        return Ok(());
    }
    solve(batch, n, start, end, rule, params, propagate);
    Ok(())
}

/// `solve_columns` on the portable build whatever the CPU (the vector build's tests compare
/// against it).
pub fn solve_columns_portable(
    batch: &mut Batch,
    start: usize,
    end: usize,
    rule: &Rule,
    params: &ColumnParams,
    propagate: bool,
) -> Result<()> {
    let n = check(batch, start, end, rule, params)?;
    solve(batch, n, start, end, rule, params, propagate);
    Ok(())
}

fn check(
    batch: &Batch,
    start: usize,
    end: usize,
    rule: &Rule,
    params: &ColumnParams,
) -> Result<usize> {
    let n = batch.columns()?;
    if start > end || end > n {
        return Err(Error::InvalidArgument(format!(
            "gptq: columns {start}..{end} outside a batch of {n}"
        )));
    }
    rule.check(params, end - start, batch.rows)?;
    Ok(n)
}

/// # Safety
/// AVX-512 F/BW/VL; the batch's shapes checked (`check`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn solve_avx512(
    batch: &mut Batch,
    n: usize,
    start: usize,
    end: usize,
    rule: &Rule,
    params: &ColumnParams,
    propagate: bool,
) {
    solve(batch, n, start, end, rule, params, propagate)
}

/// Columns per sub-block: a sub-block's columns update each other one by one; the batch's
/// later columns take the sub-block's `SUB` errors in one pass over their weights, each weight
/// still getting `w - h * e` for one column after the other, in column order (the reference's
/// order: the same bits), from a register instead of a round trip through the cache per column.
const SUB: usize = 16;
/// Rows per tile of that pass (its `SUB` error rows stay in L1: 16 KiB).
const TILE: usize = 256;

/// The loop, in the reference's order per weight (inlined into each build).
#[inline(always)]
fn solve(
    batch: &mut Batch,
    n: usize,
    start: usize,
    end: usize,
    rule: &Rule,
    params: &ColumnParams,
    propagate: bool,
) {
    let rows = batch.rows;
    let mut b0 = start;
    while b0 < end {
        let b1 = (b0 + SUB).min(end);
        for i in b0..b1 {
            let (done, rest) = batch.w.split_at_mut((i + 1) * rows);
            let col = &done[i * rows..];
            let lev = &mut batch.levels[i * rows..][..rows];
            let val = &mut batch.values[i * rows..][..rows];
            rule.round_column(params, i - start, col, lev, val);
            if !propagate {
                continue;
            }
            let e = &mut batch.err[i * rows..][..rows];
            if batch.from_original {
                for (e, &q) in e.iter_mut().zip(val.iter()) {
                    *e -= q;
                }
            } else {
                let d = batch.hinv[i * n + i];
                for ((e, &x), &q) in e.iter_mut().zip(col).zip(val.iter()) {
                    *e = (x - q) / d;
                }
            }
            // the sub-block's later columns, now (the next one is rounded next)
            let h = &batch.hinv[i * n + i + 1..i * n + b1];
            for (wj, &hij) in rest.chunks_exact_mut(rows).zip(h) {
                for (x, &ej) in wj.iter_mut().zip(e.iter()) {
                    *x -= hij * ej;
                }
            }
        }
        if propagate && b1 < n {
            let err = &batch.err[b0 * rows..b1 * rows];
            update_later(&mut batch.w[b1 * rows..], err, batch.hinv, n, b0, b1, rows);
        }
        b0 = b1;
    }
}

/// Columns `b1..n` (`w`, `[n - b1, rows]`) take the errors of columns `b0..b1` (`err`,
/// `[b1 - b0, rows]`): `w_j = w_j - hinv[i, j] * e_i` for i = b0, b0 + 1, ... in turn.
#[inline(always)]
fn update_later(
    w: &mut [f32],
    err: &[f32],
    hinv: &[f32],
    n: usize,
    b0: usize,
    b1: usize,
    rows: usize,
) {
    let k = b1 - b0;
    let mut h = [0.0f32; SUB];
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for (jj, wj) in w.chunks_exact_mut(rows).enumerate() {
            let j = b1 + jj;
            for (kk, hk) in h[..k].iter_mut().enumerate() {
                *hk = hinv[(b0 + kk) * n + j];
            }
            let seg = &mut wj[r0..r1];
            let mut chunks = seg.chunks_exact_mut(16);
            let mut r = r0;
            for c in &mut chunks {
                let mut acc = [0.0f32; 16];
                acc.copy_from_slice(c);
                for (kk, &hk) in h[..k].iter().enumerate() {
                    let e = &err[kk * rows + r..][..16];
                    for (a, &x) in acc.iter_mut().zip(e) {
                        *a -= hk * x;
                    }
                }
                c.copy_from_slice(&acc);
                r += 16;
            }
            for (t, x) in chunks.into_remainder().iter_mut().enumerate() {
                for (kk, &hk) in h[..k].iter().enumerate() {
                    *x -= hk * err[kk * rows + r + t];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
