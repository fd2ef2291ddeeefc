//! Input matrices: rows of float32, float16 or bfloat16 values, converted to f32 row by row so
//! a 16-bit input never needs a full f32 copy.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;

/// The element storage of an input matrix (16-bit types as raw bits).
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl Elems<'_> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(v) => v.len(),
            Elems::F16(v) | Elems::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A row-major matrix view: `rows` rows of `cols` values.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub elems: Elems<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Matrix<'a> {
    pub fn new(elems: Elems<'a>, rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Empty { rows, cols });
        }
        let expected = rows.checked_mul(cols).ok_or_else(|| {
            Error::InvalidArgument(format!("shape {rows}x{cols} overflows usize"))
        })?;
        if elems.len() != expected {
            return Err(Error::InvalidArgument(format!(
                "input has {} elements but shape {rows}x{cols} needs {expected}",
                elems.len()
            )));
        }
        Ok(Matrix { elems, rows, cols })
    }

    pub fn from_f32(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new(Elems::F32(data), rows, cols)
    }

    /// Row `r` as f32: borrowed for f32 input, converted into `buf` otherwise.
    pub fn row<'b>(&'b self, r: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let range = r * self.cols..(r + 1) * self.cols;
        match self.elems {
            Elems::F32(v) => &v[range],
            Elems::F16(v) => {
                buf.clear();
                buf.extend(v[range].iter().map(|&b| half::f16::from_bits(b).to_f32()));
                buf
            }
            Elems::BF16(v) => {
                buf.clear();
                buf.extend(v[range].iter().map(|&b| half::bf16::from_bits(b).to_f32()));
                buf
            }
        }
    }

    /// The first NaN or Inf in row-major order, as an error.
    pub fn check_finite(&self) -> Result<()> {
        let bad = parallel::install(|| {
            (0..self.rows).into_par_iter().find_first(|&r| {
                let mut buf = Vec::new();
                !all_finite(self.row(r, &mut buf))
            })
        });
        if let Some(row) = bad {
            let mut buf = Vec::new();
            let vals = self.row(row, &mut buf);
            let col = vals.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(Error::NonFinite {
                row,
                col,
                value: vals[col],
            });
        }
        Ok(())
    }

    /// Largest |x| over the whole matrix (order independent, so thread-count independent).
    pub fn abs_max(&self) -> f32 {
        parallel::install(|| {
            (0..self.rows)
                .into_par_iter()
                .map(|r| {
                    let mut buf = Vec::new();
                    self.row(r, &mut buf)
                        .iter()
                        .fold(0.0f32, |m, v| m.max(v.abs()))
                })
                .reduce(|| 0.0f32, f32::max)
        })
    }
}

/// True when no value is NaN or infinite: the largest magnitude bit pattern stays below the
/// all-ones exponent. Branch-free, so it vectorizes (an early-exit `any` does not).
fn all_finite(v: &[f32]) -> bool {
    v.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff)) < 0x7f80_0000
}

/// Quantize every row of `m` in parallel: `f(row_index, row_values, row_out, row_stats)` writes
/// `out_row` bytes into `out` and `stats_row` f32 statistics into `stats`.
pub fn map_rows<F>(
    m: &Matrix<'_>,
    out: &mut [u8],
    out_row: usize,
    stats: &mut [f32],
    stats_row: usize,
    f: F,
) where
    F: Fn(usize, &[f32], &mut [u8], &mut [f32]) + Sync,
{
    debug_assert_eq!(out.len(), m.rows * out_row);
    debug_assert_eq!(stats.len(), m.rows * stats_row);
    let per_task = parallel::rows_per_task(m.rows, m.cols);
    let n_tasks = m.rows.div_ceil(per_task);
    let stat_chunks: Vec<&mut [f32]> = if stats_row == 0 {
        (0..n_tasks).map(|_| <&mut [f32]>::default()).collect()
    } else {
        stats.chunks_mut(per_task * stats_row).collect()
    };
    parallel::install(|| {
        out.par_chunks_mut(per_task * out_row)
            .zip(stat_chunks.into_par_iter())
            .enumerate()
            .for_each(|(t, (o, s))| {
                let mut buf = Vec::with_capacity(m.cols);
                for (k, orow) in o.chunks_mut(out_row).enumerate() {
                    let r = t * per_task + k;
                    let srow = &mut s[k * stats_row..(k + 1) * stats_row];
                    f(r, m.row(r, &mut buf), orow, srow);
                }
            });
    });
}

/// Dequantize rows in parallel: `f(row_index, row_bytes, row_stats, out_row)`.
pub fn map_rows_out<F>(
    data: &[u8],
    in_row: usize,
    stats: &[f32],
    stats_row: usize,
    out: &mut [f32],
    cols: usize,
    f: F,
) where
    F: Fn(usize, &[u8], &[f32], &mut [f32]) + Sync,
{
    let rows = out.len() / cols;
    let per_task = parallel::rows_per_task(rows, cols);
    parallel::install(|| {
        out.par_chunks_mut(per_task * cols)
            .enumerate()
            .for_each(|(t, o)| {
                for (k, orow) in o.chunks_mut(cols).enumerate() {
                    let r = t * per_task + k;
                    let s = &stats[r * stats_row..(r + 1) * stats_row];
                    f(r, &data[r * in_row..(r + 1) * in_row], s, orow);
                }
            });
    });
}
