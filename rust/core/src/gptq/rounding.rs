//! A format's own rounding of one GPTQ column, given the column's block parameters.
//!
//! The transcription of `FormatGrid._round` / `_value` (python/ferroquant/methods/grid.py, the
//! reference) in its operation order, f32 throughout with one rounding per torch operation
//! (Rust never contracts `a * b + c` into an FMA), so that levels and values are the Python
//! loop's bit for bit. The parameters are read, never computed, here: Python fixes them with
//! the format's own quantizer (`FormatGrid.params`), so nothing about a format's scale choice
//! is duplicated.

use crate::error::{Error, Result};

/// Levels a rule may produce: every format's codes fit a byte, and the loop stores them so
/// (a quarter of the memory traffic of int64 codes, in the loop and in the packing after it).
pub const BYTE_LEVELS: usize = 256;

/// How a format turns a weight and its block's parameters into a level and a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// q4_0, q5_0 (ggml): `trunc(w * inv + offset)` in `0..=top`; value `scale * (l - center)`.
    LegacySym { offset: f32, center: i64, top: i64 },
    /// q4_1, q5_1 (ggml): `trunc((w - low) * inv + 0.5)` in `0..=top`; value `grid[l]`.
    LegacyAffine { top: i64 },
    /// q8_0 (ggml's `roundf(w * inv)`) in `-128..=127`, stored + 128; value `scale * (l - 128)`.
    Q8,
    /// Grouped integers: `round_half_even(w / rscale) + zero` in `0..=maxq`; value
    /// `scale * (l - zero)` (the stored fp16 scale, one exact product).
    Zero { maxq: f32 },
    /// int8 per row / block: `round_half_even(w / scale)` in `-127..=127`, stored + 128.
    Int8,
    /// nf4 / fp4 (bitsandbytes' buckets): `x = w * (1 / max(scale, 1e-38))`, the number of
    /// `bounds` below `x`, mapped through `order`; value `table[l] * scale`.
    Bnb {
        bounds: Vec<f32>,
        order: Vec<i64>,
        table: Vec<f32>,
    },
    /// q3_K, q6_K: `round_half_even(w / scale)` in `-center..=top - center` (0 where the scale
    /// is 0), stored + center; value `scale * (l - center)`.
    Sym { center: i64, top: i64 },
    /// iq4_nl, iq4_xs: the first nearest of `scale * table[k]`; value `table[l] * scale`.
    Table { table: Vec<f32> },
    /// Affine K-quants (q2_K, q4_K, q5_K): the first nearest value of the stored `grid`.
    Nearest,
}

/// One column's parameters per weight, `[columns, rows]` row-major (`grid`:
/// `[columns, rows, levels]`); the fields a `Rule` does not read may be empty. With a `map`,
/// column `c` reads parameter column `map[c]` (columns sharing a block's parameters share one
/// parameter column: no copy per column), else column `c`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ColumnParams<'a> {
    /// the parameter column of each column (empty: the identity)
    pub map: &'a [usize],
    pub scale: &'a [f32],
    pub inv: &'a [f32],
    pub low: &'a [f32],
    pub zero: &'a [f32],
    pub rscale: &'a [f32],
    pub grid: &'a [f32],
    /// values per weight in `grid`
    pub levels: usize,
}

impl Rule {
    /// The fields this rule reads (for the length checks).
    fn fields<'a>(&self, p: &ColumnParams<'a>) -> Vec<(&'static str, &'a [f32], usize)> {
        let grid = ("grid", p.grid, p.levels.max(1));
        match self {
            Rule::LegacySym { .. } => vec![("inv", p.inv, 1), ("scale", p.scale, 1)],
            Rule::LegacyAffine { .. } => vec![("inv", p.inv, 1), ("low", p.low, 1), grid],
            Rule::Q8 => vec![("inv", p.inv, 1), ("scale", p.scale, 1)],
            Rule::Zero { .. } => vec![
                ("rscale", p.rscale, 1),
                ("zero", p.zero, 1),
                ("scale", p.scale, 1),
            ],
            Rule::Int8 | Rule::Bnb { .. } | Rule::Sym { .. } | Rule::Table { .. } => {
                vec![("scale", p.scale, 1)]
            }
            Rule::Nearest => vec![grid],
        }
    }

    /// Checks that `p` holds `columns` columns of `rows` weights for every field read, and that
    /// the rule's own tables are consistent, its levels in `0..BYTE_LEVELS`.
    pub fn check(&self, p: &ColumnParams, columns: usize, rows: usize) -> Result<()> {
        if !p.map.is_empty() && p.map.len() != columns {
            return Err(Error::InvalidArgument(format!(
                "gptq: a parameter map of {} columns for {columns} columns",
                p.map.len()
            )));
        }
        let needed = p.map.iter().max().map_or(columns, |&m| m + 1);
        for (name, field, per) in self.fields(p) {
            let ok = if columns == 0 {
                true // nothing is read
            } else if p.map.is_empty() {
                field.len() == columns * rows * per
            } else {
                field.len() % (rows * per) == 0 && field.len() / (rows * per) >= needed
            };
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "gptq: parameter {name} has {} values, expected {needed} columns x {rows} \
                     rows x {per}",
                    field.len()
                )));
            }
        }
        let bad = match self {
            Rule::Bnb {
                bounds,
                order,
                table,
            } => {
                order.len() != bounds.len() + 1
                    || table.len() > BYTE_LEVELS
                    || order.iter().any(|&o| o < 0 || o as usize >= table.len())
            }
            Rule::Table { table } => table.is_empty() || table.len() > BYTE_LEVELS,
            Rule::Nearest => p.levels == 0 || p.levels > BYTE_LEVELS,
            // its levels index the grid: 0..=top of them
            Rule::LegacyAffine { top } => {
                *top < 0 || *top as usize >= p.levels || *top as usize >= BYTE_LEVELS
            }
            Rule::LegacySym { center, top, .. } | Rule::Sym { center, top } => {
                *top < 0 || *top as usize >= BYTE_LEVELS || *center < 0 || center > top
            }
            Rule::Zero { maxq } => !(0.0..BYTE_LEVELS as f32).contains(maxq),
            Rule::Q8 | Rule::Int8 => false,
        };
        if bad {
            return Err(Error::InvalidArgument(format!(
                "gptq: inconsistent tables for rule {self:?}"
            )));
        }
        Ok(())
    }

    /// Levels and values of the weights `w` of column `c` (an index into `p`'s columns, through
    /// `p.map` when it has one). One loop per rule (vectorised where the build allows).
    #[inline(always)]
    pub fn round_column<'a>(
        &self,
        p: &ColumnParams<'a>,
        c: usize,
        w: &[f32],
        lev: &mut [u8],
        val: &mut [f32],
    ) {
        let rows = w.len();
        let pc = if p.map.is_empty() { c } else { p.map[c] };
        let col = |f: &'a [f32]| -> &'a [f32] { &f[pc * rows..][..rows] };
        let lev = &mut lev[..rows];
        let val = &mut val[..rows];
        match self {
            Rule::LegacySym {
                offset,
                center,
                top,
            } => {
                let (inv, scale) = (col(p.inv), col(p.scale));
                let top = *top as f32;
                for r in 0..rows {
                    let t = w[r] * inv[r] + offset;
                    let l = t.trunc().clamp(0.0, top) as i64;
                    lev[r] = l as u8;
                    val[r] = scale[r] * (l - center) as f32;
                }
            }
            Rule::LegacyAffine { top } => {
                let (inv, low) = (col(p.inv), col(p.low));
                let grid = &p.grid[pc * rows * p.levels..][..rows * p.levels];
                for r in 0..rows {
                    let t = (w[r] - low[r]) * inv[r] + 0.5;
                    let l = t.trunc().clamp(0.0, *top as f32) as i64;
                    lev[r] = l as u8;
                    val[r] = grid[r * p.levels + l as usize];
                }
            }
            Rule::Q8 => {
                let (inv, scale) = (col(p.inv), col(p.scale));
                for r in 0..rows {
                    let t = w[r] * inv[r];
                    let mut q = t.trunc();
                    if (t - q).abs() >= 0.5 {
                        q += sign(t);
                    }
                    let l = q.clamp(-128.0, 127.0) as i64 + 128;
                    lev[r] = l as u8;
                    val[r] = scale[r] * (l - 128) as f32;
                }
            }
            Rule::Zero { maxq } => {
                let (zero, rscale, scale) = (col(p.zero), col(p.rscale), col(p.scale));
                for r in 0..rows {
                    let z = zero[r];
                    let l = ((w[r] / rscale[r]).round_ties_even() + z).clamp(0.0, *maxq);
                    lev[r] = l as u8;
                    val[r] = scale[r] * (l - z);
                }
            }
            Rule::Int8 => {
                let scale = col(p.scale);
                for r in 0..rows {
                    let a = scale[r];
                    let d = if a == 0.0 { 1.0 } else { a };
                    let l = (w[r] / d).round_ties_even().clamp(-127.0, 127.0) as i64 + 128;
                    lev[r] = l as u8;
                    val[r] = a * (l - 128) as f32;
                }
            }
            Rule::Bnb {
                bounds,
                order,
                table,
            } => {
                let scale = col(p.scale);
                for r in 0..rows {
                    let a = scale[r];
                    let y = w[r] * (1.0 / a.max(1e-38));
                    let idx = bounds.iter().filter(|&&b| y > b).count();
                    let l = order[idx];
                    lev[r] = l as u8;
                    val[r] = table[l as usize] * a;
                }
            }
            Rule::Sym { center, top } => {
                let scale = col(p.scale);
                let lo = -(*center as f32);
                let hi = (top - center) as f32;
                for r in 0..rows {
                    let a = scale[r];
                    let l = if a == 0.0 {
                        *center
                    } else {
                        (w[r] / a).round_ties_even().clamp(lo, hi) as i64 + center
                    };
                    lev[r] = l as u8;
                    val[r] = a * (l - center) as f32;
                }
            }
            Rule::Table { table } => {
                let scale = col(p.scale);
                for r in 0..rows {
                    let a = scale[r];
                    let l = first_nearest(table.iter().map(|&t| a * t), w[r]);
                    lev[r] = l as u8;
                    val[r] = table[l] * a;
                }
            }
            Rule::Nearest => {
                let grid = &p.grid[pc * rows * p.levels..][..rows * p.levels];
                for r in 0..rows {
                    let g = &grid[r * p.levels..][..p.levels];
                    let l = first_nearest(g.iter().copied(), w[r]);
                    lev[r] = l as u8;
                    val[r] = g[l];
                }
            }
        }
    }
}

/// torch.sign: 0 for 0.
#[inline(always)]
fn sign(t: f32) -> f32 {
    if t > 0.0 {
        1.0
    } else if t < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The index of the first candidate nearest `x` (torch's `argmin` of `|v - x|`).
#[inline(always)]
fn first_nearest(values: impl Iterator<Item = f32>, x: f32) -> usize {
    let mut best = (0, f32::INFINITY);
    for (k, v) in values.enumerate() {
        let d = (v - x).abs();
        if d < best.1 {
            best = (k, d);
        }
    }
    best.0
}
