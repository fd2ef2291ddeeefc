//! Grouped integers: the weight format of GPTQ and AWQ checkpoints (GPTQModel, AutoAWQ,
//! llm-compressor's W4A16), `int{bits}_g{group|ch}[_sym]` in the qtype table.
//!
//! **Values.** Each row (output channel) is cut into groups of `group` weights (per-channel:
//! the whole row). A group has an fp16 scale `s` and an integer zero `z` (`sym`: `z =
//! 2^(bits-1)`); a weight is a code `q` in `0..=maxq` (`maxq = 2^bits - 1`) and stands for
//! `(q - z) · s`, computed in f32 (exact: |q - z| < 2^8 times an 11-bit fp16 mantissa), which
//! is also what the peers' fp16 `s · (q - z)` rounds to.
//!
//! **Reference quantizer** (GPTQ's / GPTQModel's `Quantizer.find_params` + `quantize`, f32):
//! `xmin = min(min(x), 0)`, `xmax = max(max(x), 0)`; `sym`: `xmax = max(|xmin|, xmax)` and,
//! when `xmin < 0`, `xmin = -xmax` (an all-non-negative group keeps `xmin = 0`, as the peer
//! does); a group with `xmin = xmax = 0` takes `-1, +1`. `scale = (xmax - xmin) / maxq` (a
//! zero scale becomes f32's smallest normal), `z = round(-xmin / scale)` (asym),
//! `q = clamp(round(x / scale) + z, 0, maxq)`, rounding half to even (torch.round); the stored
//! scale is `f16(scale)`.
//!
//! **Layout.** `data`: each row's codes as one little-endian bit stream, code `j` in bits
//! `j·bits .. (j+1)·bits` (4 bits: element 2j in the low nibble; 3 bits: 8 codes in 3 bytes), so
//! a row is `cols · bits / 8` bytes. `stats` (f32): per row, the `groups` scales (fp16 values)
//! followed, unless `sym`, by the `groups` zeros.
//!
//! **Float zeros** (`int{b}_g{group}_fz`, `GInt::float_zero`; the hqq package's stored form):
//! the zero of each group is an fp16 value `z` (any finite one) instead of an integer, stored
//! where the integer zeros are; a weight stands for `(q as f32 - z) · s` in f32 (two roundings).
//! Reference quantizer (hqq's min/max start, `round_zero=False`): per group `xmin = min(x)`,
//! `xmax = max(x)`, `s = f16((xmax - xmin) / maxq)`, `z = f16(-xmin / s)`, codes the nearest
//! of the stored grid, `q = clamp(round(x / s + z), 0, maxq)` (half to even). A flat group
//! (`xmin = xmax`) takes `s = 1`, `z = f16(-xmin)` (it decodes to `f16(x)`, 0 to 0); a scale
//! below fp16's smallest normal or a zero beyond ±64 (fp16 would hold it to worse than 2^-6 of
//! a step: a group far from 0) takes the integer rule's range instead (0 included, so `z` is in
//! `0..=maxq`): `(min(xmin, 0), max(xmax, 0))`. Every weight is then within `0.53 s` of its
//! decode: half a step, plus at the clipped ends the zero's fp16 rounding (at most 2^-6 steps)
//! and the scale's (2^-11 relative, times maxq steps).
//!
//! **Matmul** (`matmul`), against q16 activations (`matmul::reference::q16`): at 4 and 8 bits on
//! CPUs with AVX-512 VNNI the codes are read in place (`matmul::reference::gint` defines the
//! arithmetic: integer sums of codes times activations, the fp16 scale, and the zero as an f32
//! term per group); elsewhere a weight row decodes to `q - z` as int8 with one scale per group
//! and runs the int8 kernels, bit-for-bit the int8 product of the decoded row. 8 bits are
//! symmetric only, so `q - z` always fits an int8. Float zeros always take the decode path: the
//! row decodes to `q - zi` with `zi = int_zero(z)` (`z` rounded, clamped to `0..=maxq`) and
//! `matmul::float_zero` adds the exact rest, `s (zi - z) Σx`.

use crate::error::{Error, Result};
use crate::formats::tensor::{Quantized, QuantizedView};
use crate::input::{map_rows, map_rows_out, Matrix};
use crate::parallel;
use crate::qtype::{GInt, QType};
use rayon::prelude::*;

mod qdq;
pub use qdq::{qdq, qdq_scaled};

/// Weights sharing one scale in a row of `cols`.
pub fn group_len(g: GInt, cols: usize) -> usize {
    if g.group == 0 {
        cols
    } else {
        g.group as usize
    }
}

/// Statistics per row: the scales, then (asymmetric) the zeros.
pub fn stats_per_row(g: GInt, cols: usize) -> usize {
    let groups = cols / group_len(g, cols);
    if g.sym {
        groups
    } else {
        2 * groups
    }
}

/// The row length must split into whole groups (and per-channel rows into whole bytes of codes).
pub fn check_shape(qtype: QType, g: GInt, rows: usize, cols: usize) -> Result<()> {
    let unit = g.row_unit();
    if cols == 0 || !cols.is_multiple_of(unit) {
        return Err(Error::RowLength {
            qtype: qtype.name(),
            rows,
            cols,
            block_size: unit,
        });
    }
    Ok(())
}

#[inline]
fn maxq(g: GInt) -> u32 {
    (1u32 << g.bits) - 1
}

/// Round half to even (torch.round), for |v| < 2^22.
#[inline]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() >= 4_194_304.0 {
        return v;
    }
    (v + MAGIC) - MAGIC
}

/// The f32 scale and the zero of one group (the module comment's rule).
pub fn group_params(g: GInt, x: &[f32]) -> (f32, u32) {
    let xmin = x.iter().fold(0f32, |m, &v| m.min(v));
    let xmax = x.iter().fold(0f32, |m, &v| m.max(v));
    range_params(g, xmin, xmax)
}

/// `group_params` from the group's `min(min(x), 0)` and `max(max(x), 0)`.
#[inline(always)]
fn range_params(g: GInt, mut xmin: f32, mut xmax: f32) -> (f32, u32) {
    let mq = maxq(g) as f32;
    if g.sym {
        xmax = xmax.max(xmin.abs());
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    let empty = if g.sym {
        xmax == 0.0
    } else {
        xmin == 0.0 && xmax == 0.0
    };
    if empty {
        xmin -= 1.0;
        xmax += 1.0;
    }
    let mut scale = (xmax - xmin) / mq;
    if scale == 0.0 {
        scale = f32::MIN_POSITIVE;
    }
    let zero = if g.sym {
        1u32 << (g.bits - 1)
    } else {
        round_even(-xmin / scale).clamp(0.0, mq) as u32
    };
    (scale, zero)
}

/// One code: `clamp(round(x / scale) + zero, 0, maxq)`.
#[inline]
pub fn quantize_value(x: f32, scale: f32, zero: u32, maxq: u32) -> u32 {
    (round_even(x / scale) + zero as f32).clamp(0.0, maxq as f32) as u32
}

/// `quantize_value` of every weight of a group into `out`, the same bits, written so that it
/// vectorizes (round_even's large-value branch a select, the conversion through i32 of a value
/// already clamped to `0..=maxq`; NaN gives 0 either way), in an AVX-512 build where the CPU
/// has it: the GPTQ solve quantizes every weight once for its block parameters.
pub fn group_codes(x: &[f32], scale: f32, zero: u32, maxq: u32, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512 F/BW/VL were detected (`has_avx512`); slices only.
        unsafe { group_codes_avx512(x, scale, zero, maxq, out) };
        return;
    }
    group_codes_body(x, scale, zero, maxq, out);
}

/// # Safety
/// AVX-512 F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn group_codes_avx512(x: &[f32], scale: f32, zero: u32, maxq: u32, out: &mut [u32]) {
    group_codes_body(x, scale, zero, maxq, out)
}

#[inline(always)]
fn group_codes_body(x: &[f32], scale: f32, zero: u32, maxq: u32, out: &mut [u32]) {
    const MAGIC: f32 = 12_582_912.0;
    let (z, mq) = (zero as f32, maxq as f32);
    for (c, &v) in out.iter_mut().zip(x) {
        let q = v / scale;
        let r = if q.abs() >= 4_194_304.0 {
            q
        } else {
            (q + MAGIC) - MAGIC
        };
        *c = (r + z).clamp(0.0, mq) as i32 as u32;
    }
}

/// The largest |zero| the float-zero RTN rule keeps (module comment).
pub const FZ_ZERO_MAX: f32 = 64.0;

/// The fp16 scale and fp16 zero of one float-zero group (the module comment's rule).
pub fn group_params_fz(g: GInt, x: &[f32]) -> (f32, f32) {
    let mq = maxq(g) as f32;
    let xmin = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let xmax = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if xmax == xmin {
        // flat (an empty range has no step): code 0 and `z = -x`, so the group decodes to f16(x)
        return (1.0, f16_round(-xmin));
    }
    let s = f16_round((xmax - xmin) / mq);
    if s >= half::f16::MIN_POSITIVE.to_f32() {
        let z = f16_round(-xmin / s);
        // |z| <= 64: fp16 holds z to 2^-6 of a step (beyond, a far-off group would lose up to
        // half a step and more to the zero's rounding)
        if z.abs() <= FZ_ZERO_MAX {
            return (s, z);
        }
    }
    // the integer rule's range: 0 is in it, so z = -lo / s lies in 0..=maxq
    let (lo, hi) = (xmin.min(0.0), xmax.max(0.0));
    let s = f16_round((hi - lo) / mq).max(half::f16::MIN_POSITIVE.to_f32());
    (s, f16_round(-lo / s))
}

/// A code against a float-zero group's stored scale and zero: `clamp(round(x / s + z), 0,
/// maxq)`, the nearest level of `(q - z) · s`.
#[inline]
pub fn quantize_value_fz(x: f32, s: f32, z: f32, maxq: u32) -> u32 {
    round_even(x / s + z).clamp(0.0, maxq as f32) as u32
}

/// The integer zero a float zero decodes with in the int8 kernels: `round(z)` (half to even)
/// clamped to `0..=maxq`, so `q - zi` fits an int8.
#[inline]
pub fn int_zero(g: GInt, z: f32) -> u8 {
    round_even(z).clamp(0.0, maxq(g) as f32) as u8
}

/// Code `j` of a packed row.
#[inline]
pub fn code(row: &[u8], j: usize, bits: u8) -> u32 {
    let bit = j * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    let lo = row[byte] as u32;
    let hi = row.get(byte + 1).copied().unwrap_or(0) as u32;
    ((lo | hi << 8) >> shift) & ((1 << bits) - 1)
}

/// Write the codes of a row as the little-endian bit stream of the module comment.
pub fn pack_row(codes: &[u32], bits: u8, out: &mut [u8]) {
    if bits == 4 {
        // whole bytes, two codes each (the loop below gives the same bytes; faster)
        for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *o = (c[0] | c[1] << 4) as u8;
        }
        return;
    }
    out.fill(0);
    for (j, &c) in codes.iter().enumerate() {
        let bit = j * bits as usize;
        let (byte, shift) = (bit / 8, bit % 8);
        let v = c << shift;
        out[byte] |= v as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (v >> 8) as u8;
        }
    }
}

/// The fp16 value of an f32 scale, as f32.
#[inline]
pub fn f16_round(s: f32) -> f32 {
    half::f16::from_f32(s).to_f32()
}

pub fn quantize(m: &Matrix<'_>, qtype: QType, g: GInt) -> Result<Quantized> {
    check_shape(qtype, g, m.rows, m.cols)?;
    let (cols, gl, mq) = (m.cols, group_len(g, m.cols), maxq(g));
    let groups = cols / gl;
    let row_bytes = qtype.row_bytes(cols, gl);
    let spr = stats_per_row(g, cols);
    let mut data = vec![0u8; m.rows * row_bytes];
    let mut stats = vec![0f32; m.rows * spr];
    map_rows(m, &mut data, row_bytes, &mut stats, spr, |_, x, out, st| {
        let mut codes = vec![0u32; cols];
        for (k, (xg, cg)) in x
            .chunks_exact(gl)
            .zip(codes.chunks_exact_mut(gl))
            .enumerate()
        {
            if g.float_zero {
                let (s, z) = group_params_fz(g, xg);
                for (c, &v) in cg.iter_mut().zip(xg) {
                    *c = quantize_value_fz(v, s, z, mq);
                }
                (st[k], st[groups + k]) = (s, z);
                continue;
            }
            let (scale, zero) = group_params(g, xg);
            group_codes(xg, scale, zero, mq, cg);
            st[k] = f16_round(scale);
            if !g.sym {
                st[groups + k] = zero as f32;
            }
        }
        pack_row(&codes, g.bits, out);
    });
    Ok(Quantized {
        qtype,
        rows: m.rows,
        cols,
        block_size: gl,
        scale_mode: None,
        data,
        stats,
        double_quant: None,
    })
}

/// Check a grouped view's geometry and statistics (a view may come from a file or Python).
pub fn validate(q: &QuantizedView<'_>, g: GInt) -> Result<()> {
    validate_shape(q, g)?;
    validate_zeros(q, g)
}

/// `validate`'s geometry part: the shape, the group length and the statistics' length.
pub fn validate_shape(q: &QuantizedView<'_>, g: GInt) -> Result<()> {
    check_shape(q.qtype, g, q.rows, q.cols)?;
    let gl = group_len(g, q.cols);
    if q.block_size != gl {
        return Err(Error::InvalidArgument(format!(
            "{} of {} columns has groups of {gl}, got block_size={}",
            q.qtype.name(),
            q.cols,
            q.block_size
        )));
    }
    let expected = q.rows * stats_per_row(g, q.cols);
    if q.stats.len() != expected {
        return Err(Error::DataSize {
            what: "stats",
            qtype: q.qtype.name(),
            rows: q.rows,
            cols: q.cols,
            got: q.stats.len(),
            expected,
        });
    }
    Ok(())
}

/// `validate`'s check of the zeros (the view's shape checked by `validate_shape`): fp16 zeros
/// of the float-zero formats, integers in `0..=maxq` for the other asymmetric ones.
pub fn validate_zeros(q: &QuantizedView<'_>, g: GInt) -> Result<()> {
    let gl = group_len(g, q.cols);
    if g.float_zero {
        let groups = q.cols / gl;
        for (r, st) in q.stats.chunks_exact(2 * groups).enumerate() {
            if let Some(z) = st[groups..]
                .iter()
                .find(|z| !z.is_finite() || f16_round(**z) != **z)
            {
                return Err(Error::InvalidArgument(format!(
                    "{}: zero point {z} of row {r} is not a finite fp16 value",
                    q.qtype.name()
                )));
            }
        }
    } else if !g.sym {
        let groups = q.cols / gl;
        let mq = maxq(g) as f32;
        // A branch-free pass first, the search for the message only when it fails (qmatmul at
        // M = 1 on the fused kernel checks each row as it reads it instead: `row_zeros_ok`).
        if q.stats
            .chunks_exact(2 * groups)
            .all(|st| integer_zeros(&st[groups..], mq))
        {
            return Ok(());
        }
        for (r, st) in q.stats.chunks_exact(2 * groups).enumerate() {
            if let Some(z) = st[groups..]
                .iter()
                .find(|z| !(0.0..=mq).contains(*z) || z.fract() != 0.0)
            {
                return Err(Error::InvalidArgument(format!(
                    "{}: zero point {z} of row {r} is not an integer in 0..={mq}",
                    q.qtype.name()
                )));
            }
        }
    }
    Ok(())
}

/// Whether one row's statistics (`stats`: its `groups` scales, then its zeros) pass
/// `validate_zeros` for an asymmetric integer-zero `g` (the M = 1 fused kernel checks each row
/// it reads this way instead of a pass over every zero before the call).
pub fn row_zeros_ok(g: GInt, stats: &[f32], groups: usize) -> bool {
    debug_assert!(!g.sym && !g.float_zero);
    integer_zeros(&stats[groups..2 * groups], maxq(g) as f32)
}

/// Whether every zero is an integer in `0..=mq` (NaN fails): `(z + 2^23) - 2^23` rounds a
/// z in 0..2^23 to an integer, so it equals z exactly when z is one. No branch and no libm
/// call in the loop, so it vectorizes.
fn integer_zeros(zeros: &[f32], mq: f32) -> bool {
    const ROUNDER: f32 = 8_388_608.0;
    zeros.iter().fold(true, |ok, &z| {
        ok & (z >= 0.0) & (z <= mq) & ((z + ROUNDER) - ROUNDER == z)
    })
}

/// The integer zero `decode_row_i8` subtracts from the codes of group `gi` (`stats`: one
/// row's scales, then its zeros).
#[inline(always)]
pub fn row_zero(g: GInt, stats: &[f32], groups: usize, gi: usize) -> u8 {
    if g.sym {
        1u8 << (g.bits - 1)
    } else if g.float_zero {
        int_zero(g, stats[groups + gi])
    } else {
        stats[groups + gi] as u8
    }
}

/// Columns `k0..k0 + kc` of a packed row of `cols` (its `stats`: the row's scales, then its
/// zeros) as `decode_row_i8` gives them when the chunk is taken as a row of its own: whole
/// groups (the group divides the chunk) or a piece of the one per-channel group. `w` gets the
/// chunk's codes, `scales` (at least `kc / 32` long) its groups' scales; returns the group
/// length within the chunk (the bf16 GEMMs' chunk decode).
pub fn decode_chunk_i8(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    cols: usize,
    (k0, kc): (usize, usize),
    w: &mut Vec<u8>,
    scales: &mut [f32],
) -> usize {
    let bl = group_len(g, cols);
    let groups = cols / bl;
    let (g0, gc) = if g.group == 0 {
        (0, 1)
    } else {
        (k0 / bl, kc / bl)
    };
    // (chunks of at most 512 columns in groups of at least 32: 16 groups)
    let mut st = [0.0f32; 32];
    st[..gc].copy_from_slice(&stats[g0..g0 + gc]);
    if !g.sym {
        st[gc..2 * gc].copy_from_slice(&stats[groups + g0..groups + g0 + gc]);
    }
    w.resize(kc, 0);
    let bits = g.bits as usize;
    let bytes = &row[k0 * bits / 8..(k0 + kc) * bits / 8];
    decode_row_i8(g, bytes, &st[..2 * gc], kc, w, &mut scales[..gc]);
    if g.group == 0 {
        kc
    } else {
        bl
    }
}

/// A packed row as `q - z` (int8) and its scales: the weights the int8 matmul kernels read.
/// Whole bytes at a time (2, 4 and 8 bits: codes never straddle a byte; 3 bits: 8 codes in 3
/// bytes), so that the loops vectorize; the same values as `code`.
pub fn decode_row_i8(
    g: GInt,
    row: &[u8],
    stats: &[f32],
    cols: usize,
    w: &mut [u8],
    scales: &mut [f32],
) {
    let gl = group_len(g, cols);
    let groups = cols / gl;
    scales.copy_from_slice(&stats[..groups]);
    let gb = gl * g.bits as usize / 8;
    for (k, (wg, rg)) in w[..cols]
        .chunks_exact_mut(gl)
        .zip(row.chunks_exact(gb))
        .enumerate()
    {
        let z = row_zero(g, stats, groups, k);
        match g.bits {
            8 => {
                for (o, &b) in wg.iter_mut().zip(rg) {
                    *o = b.wrapping_sub(z);
                }
            }
            4 => {
                for (o, &b) in wg.chunks_exact_mut(2).zip(rg) {
                    o[0] = (b & 15).wrapping_sub(z);
                    o[1] = (b >> 4).wrapping_sub(z);
                }
            }
            2 => {
                for (o, &b) in wg.chunks_exact_mut(4).zip(rg) {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = ((b >> (2 * i)) & 3).wrapping_sub(z);
                    }
                }
            }
            _ => {
                for (o, t) in wg.chunks_exact_mut(8).zip(rg.chunks_exact(3)) {
                    let v = t[0] as u32 | (t[1] as u32) << 8 | (t[2] as u32) << 16;
                    for (i, c) in o.iter_mut().enumerate() {
                        *c = ((v >> (3 * i)) as u8 & 7).wrapping_sub(z);
                    }
                }
            }
        }
    }
}

pub fn dequantize(q: &QuantizedView<'_>, g: GInt, out: &mut [f32]) -> Result<()> {
    validate(q, g)?;
    let (cols, gl) = (q.cols, group_len(g, q.cols));
    let groups = cols / gl;
    let row_bytes = q.qtype.row_bytes(cols, gl);
    let spr = stats_per_row(g, cols);
    map_rows_out(q.data, row_bytes, q.stats, spr, out, cols, |_, d, st, y| {
        if g.float_zero {
            for (j, v) in y.iter_mut().enumerate() {
                let k = j / gl;
                *v = (code(d, j, g.bits) as f32 - st[groups + k]) * st[k];
            }
            return;
        }
        for (j, v) in y.iter_mut().enumerate() {
            let k = j / gl;
            let z = if g.sym {
                1i32 << (g.bits - 1)
            } else {
                st[groups + k] as i32
            };
            *v = (code(d, j, g.bits) as i32 - z) as f32 * st[k];
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests;
