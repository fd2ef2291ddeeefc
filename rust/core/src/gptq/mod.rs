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
//! **Numerics.** f32, in the reference's operation order: `e = (w - q) / d` (torch's `sub` then
//! `div_`), and `w_j = w_j - (h_ij * e)` (the reference's `outer` then `sub_`: a product, then a
//! difference, two roundings; no FMA: Rust never contracts). Each weight's update is independent of the others, so the
//! result is the reference's bit for bit, whatever the vector width; tests in Python compare
//! the stored bytes of both loops on every format.

pub mod rounding;

pub use rounding::{ColumnParams, Rule};

use crate::error::{Error, Result};

/// One lazy batch of GPTQ, transposed: every buffer is `[n, rows]` except `hinv` (`[n, n]`).
pub struct Batch<'a> {
    pub rows: usize,
    /// the batch's weights, updated in place
    pub w: &'a mut [f32],
    /// the batch's block of the inverse Hessian's upper Cholesky factor
    pub hinv: &'a [f32],
    /// each column's scaled error (for the update of the later batches)
    pub err: &'a mut [f32],
    pub levels: &'a mut [i64],
    pub values: &'a mut [f32],
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
/// `i - start`) and, if `propagate`, pushes each column's error onto the batch's later columns.
pub fn solve_columns(
    batch: &mut Batch,
    start: usize,
    end: usize,
    rule: &Rule,
    params: &ColumnParams,
    propagate: bool,
) -> Result<()> {
    let n = batch.columns()?;
    let rows = batch.rows;
    if start > end || end > n {
        return Err(Error::InvalidArgument(format!(
            "gptq: columns {start}..{end} outside a batch of {n}"
        )));
    }
    rule.check(params, end - start, rows)?;
    for i in start..end {
        let (done, rest) = batch.w.split_at_mut((i + 1) * rows);
        let col = &done[i * rows..];
        let lev = &mut batch.levels[i * rows..][..rows];
        let val = &mut batch.values[i * rows..][..rows];
        rule.round_column(params, i - start, col, lev, val);
        if !propagate {
            continue;
        }
        let d = batch.hinv[i * n + i];
        let e = &mut batch.err[i * rows..][..rows];
        for ((e, &x), &q) in e.iter_mut().zip(col).zip(val.iter()) {
            *e = (x - q) / d;
        }
        let h = &batch.hinv[i * n + i + 1..(i + 1) * n];
        for (wj, &hij) in rest.chunks_exact_mut(rows).zip(h) {
            for (x, &ej) in wj.iter_mut().zip(e.iter()) {
                *x -= hij * ej;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
