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

/// `quantize` then `dequantize` of `m`, value for value, without packing the codes (integer
/// zeros only): `(clamp(round(x / scale) + z, 0, maxq) - z) · f16(scale)` in f32, the product
/// `dequantize` computes. A search that tries many candidate weights (AWQ's scale and clip
/// searches) needs only these values; the round trip packs, unpacks and allocates the bytes
/// between (about 3x this one's work).
pub fn qdq(m: &Matrix<'_>, qtype: QType, g: GInt) -> Result<Vec<f32>> {
    qdq_checks(m, qtype, g)?;
    let (cols, gl) = (m.cols, group_len(g, m.cols));
    let mut out = vec![0f32; m.rows * cols];
    let per_task = parallel::rows_per_task(m.rows, cols);
    let wide = qdq_wide_usable();
    parallel::install(|| {
        out.par_chunks_mut(per_task * cols)
            .enumerate()
            .for_each(|(t, o)| {
                let mut buf = Vec::new();
                for (k, orow) in o.chunks_mut(cols).enumerate() {
                    let x = m.row(t * per_task + k, &mut buf);
                    qdq_row(g, gl, x, orow, wide);
                }
            });
    });
    Ok(out)
}

/// `qdq` of `m` with its columns scaled, scaled back: `qdq(x · s) / s` per column, each an
/// f32 product and quotient (torch's `qdq(w * s) / s` bit for bit): AWQ's candidate weights,
/// one call instead of two elementwise passes and their buffers. `scale` has one finite,
/// positive value per column; a scaled value that overflows is refused as `qdq` refuses
/// non-finite input.
pub fn qdq_scaled(m: &Matrix<'_>, qtype: QType, g: GInt, scale: &[f32]) -> Result<Vec<f32>> {
    if scale.len() != m.cols {
        return Err(Error::InvalidArgument(format!(
            "{}: {} scales for {} columns",
            qtype.name(),
            scale.len(),
            m.cols
        )));
    }
    if let Some((j, s)) = scale
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(Error::InvalidArgument(format!(
            "{}: scale {s} at column {j} (scales must be finite and positive)",
            qtype.name()
        )));
    }
    qdq_checks(m, qtype, g)?;
    let (cols, gl) = (m.cols, group_len(g, m.cols));
    let mut out = vec![0f32; m.rows * cols];
    let per_task = parallel::rows_per_task(m.rows, cols);
    let wide = qdq_wide_usable();
    // a row at a time through one scratch row (no scaled copy of the matrix); each task
    // reports its first overflowing product, the least (row, column) of them is the error
    let bad = parallel::install(|| {
        out.par_chunks_mut(per_task * cols)
            .enumerate()
            .filter_map(|(t, o)| {
                let (mut buf, mut xs) = (Vec::new(), vec![0f32; cols]);
                for (k, orow) in o.chunks_mut(cols).enumerate() {
                    let r = t * per_task + k;
                    let x = m.row(r, &mut buf);
                    if scale_row(x, scale, &mut xs, wide) > f32::MAX.to_bits() {
                        let c = xs.iter().position(|v| !v.is_finite()).unwrap_or(0);
                        return Some((r, c, xs[c]));
                    }
                    qdq_row(g, gl, &xs, orow, wide);
                    unscale_row(orow, scale, wide);
                }
                None
            })
            .min_by_key(|&(r, c, _)| (r, c))
    });
    if let Some((row, col, value)) = bad {
        return Err(Error::NonFinite { row, col, value });
    }
    Ok(out)
}

/// `out = x · s` per element; returns the largest magnitude's bits (above `f32::MAX`'s: an
/// overflow). `wide`: the same IEEE products compiled for AVX-512 (the portable build is SSE2).
fn scale_row(x: &[f32], s: &[f32], out: &mut [f32], wide: bool) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is `qdq_wide_usable()`, which checked the CPU for AVX-512 at run time.
        return unsafe { scale_row_avx512(x, s, out) };
    }
    let _ = wide;
    scale_row_body(x, s, out)
}

/// `out /= s` per element (`scale_row`'s inverse step, IEEE quotients either build).
fn unscale_row(out: &mut [f32], s: &[f32], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is `qdq_wide_usable()`, which checked the CPU for AVX-512 at run time.
        unsafe { unscale_row_avx512(out, s) };
        return;
    }
    let _ = wide;
    unscale_row_body(out, s);
}

#[inline(always)]
fn scale_row_body(x: &[f32], s: &[f32], out: &mut [f32]) -> u32 {
    let mut worst = 0u32;
    for ((y, &v), &k) in out.iter_mut().zip(x).zip(s) {
        let p = v * k;
        *y = p;
        worst = worst.max(p.to_bits() & 0x7fff_ffff);
    }
    worst
}

#[inline(always)]
fn unscale_row_body(out: &mut [f32], s: &[f32]) {
    for (y, &k) in out.iter_mut().zip(s) {
        *y /= k;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn scale_row_avx512(x: &[f32], s: &[f32], out: &mut [f32]) -> u32 {
    scale_row_body(x, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn unscale_row_avx512(out: &mut [f32], s: &[f32]) {
    unscale_row_body(out, s);
}

/// `qdq`'s checks of its input: the shape, integer zeros, finite values.
fn qdq_checks(m: &Matrix<'_>, qtype: QType, g: GInt) -> Result<()> {
    check_shape(qtype, g, m.rows, m.cols)?;
    if g.float_zero {
        return Err(Error::InvalidArgument(format!(
            "{}: qdq takes integer zeros only (quantize and dequantize a float-zero format)",
            qtype.name()
        )));
    }
    m.check_finite()
}

/// Whether `qdq_row` may take its AVX-512 build (`qdq_row_avx512`).
fn qdq_wide_usable() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::has_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One row of `qdq`: `qdq_row_scalar`'s code compiled for AVX-512 when `wide` (16-lane
/// vectors: the same IEEE operations per element, so the same bits; Rust never contracts a
/// product and a sum into an FMA), else as it is.
fn qdq_row(g: GInt, gl: usize, x: &[f32], out: &mut [f32], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is `qdq_wide_usable()`, which checked the CPU for AVX-512 F/BW/VL
        // (and FMA) at run time.
        unsafe { qdq_row_avx512(g, gl, x, out) };
        return;
    }
    let _ = wide;
    qdq_row_scalar(g, gl, x, out);
}

/// `qdq_row_scalar` with each group's min and max on 16-lane vectors and one reduction (min
/// and max of finite values are exact in any order; a zero's sign cannot change the group's
/// scale or zero), the rest the same code compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn qdq_row_avx512(g: GInt, gl: usize, x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    if !gl.is_multiple_of(16) {
        return qdq_row_scalar(g, gl, x, out);
    }
    let mq = maxq(g) as f32;
    for (xg, yg) in x.chunks_exact(gl).zip(out.chunks_exact_mut(gl)) {
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for c in xg.chunks_exact(16) {
            // SAFETY: `c` is 16 f32s (chunks_exact); loadu takes any alignment.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        let (scale, zero) = range_params(g, _mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        let (s16, z) = (f16_round(scale), zero as f32);
        for (y, &v) in yg.iter_mut().zip(xg) {
            let c = (round_even(v / scale) + z).clamp(0.0, mq);
            *y = (c - z) * s16;
        }
    }
}

/// Quantize and dequantize one row group by group: `group_params` (its min / max on 16
/// running lanes, which the compiler vectorizes: the same values, min and max being exact),
/// `quantize_value`'s code (exact in f32), then `dequantize`'s product.
#[inline(always)]
fn qdq_row_scalar(g: GInt, gl: usize, x: &[f32], out: &mut [f32]) {
    let mq = maxq(g) as f32;
    for (xg, yg) in x.chunks_exact(gl).zip(out.chunks_exact_mut(gl)) {
        let (xmin, xmax) = min_max_with_zero(xg);
        let (scale, zero) = range_params(g, xmin, xmax);
        let (s16, z) = (f16_round(scale), zero as f32);
        for (y, &v) in yg.iter_mut().zip(xg) {
            let c = (round_even(v / scale) + z).clamp(0.0, mq);
            *y = (c - z) * s16;
        }
    }
}

/// `(min(min(x), 0), max(max(x), 0))` of finite values, on 16 independent lanes.
#[inline(always)]
fn min_max_with_zero(x: &[f32]) -> (f32, f32) {
    const L: usize = 16;
    let (mut lo, mut hi) = ([0f32; L], [0f32; L]);
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            lo[l] = lo[l].min(c[l]);
            hi[l] = hi[l].max(c[l]);
        }
    }
    let (mut a, mut b) = (0f32, 0f32);
    for &v in chunks.remainder() {
        a = a.min(v);
        b = b.max(v);
    }
    for l in 0..L {
        a = a.min(lo[l]);
        b = b.max(hi[l]);
    }
    (a, b)
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
        let z = if g.sym {
            1u8 << (g.bits - 1)
        } else if g.float_zero {
            int_zero(g, stats[groups + k])
        } else {
            stats[groups + k] as u8
        };
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
mod tests {
    use super::*;
    use crate::input::Matrix;

    fn g(bits: u8, group: u16, sym: bool) -> GInt {
        GInt {
            bits,
            group,
            sym,
            float_zero: false,
        }
    }

    #[test]
    fn pack_and_code_round_trip_every_width() {
        for bits in [2u8, 3, 4, 8] {
            let codes: Vec<u32> = (0..64).map(|j| (j * 7 + 3) as u32 % (1 << bits)).collect();
            let mut out = vec![0u8; 64 * bits as usize / 8];
            pack_row(&codes, bits, &mut out);
            let back: Vec<u32> = (0..64).map(|j| code(&out, j, bits)).collect();
            assert_eq!(back, codes, "bits {bits}");
        }
        // 4 bits: element 2j in the low nibble.
        let mut out = [0u8; 1];
        pack_row(&[0x3, 0xa], 4, &mut out);
        assert_eq!(out[0], 0xa3);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn qdq_rows_avx512_and_scalar_agree_bit_for_bit() {
        // the AVX-512 build against the scalar one, on random groups with zeros, -0.0, huge
        // and tiny values, flat and one-signed groups, every width and a ragged row
        let mut rnd = uniform(777u64);
        if !qdq_wide_usable() {
            return; // nothing to compare on this CPU (the scalar build is the reference)
        }
        for (bits, group, sym) in [
            (4, 64, false),
            (4, 32, true),
            (3, 32, false),
            (8, 64, true),
            (2, 32, false),
            (4, 0, false),
        ] {
            let gi = g(bits, group, sym);
            for cols in [64usize, 192, 576] {
                let gl = group_len(gi, cols);
                let mut x: Vec<f32> = (0..cols).map(|_| rnd() * 4.0).collect();
                x[0] = -0.0;
                x[1] = 1e30 * rnd();
                x[2] = 1e-38 * rnd();
                x[3] = 4_194_304.5;
                if cols >= 128 {
                    x[64..96].fill(0.7);
                    x[96..128].iter_mut().for_each(|v| *v = -v.abs());
                }
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                qdq_row_scalar(gi, gl, &x, &mut a);
                // SAFETY: qdq_wide_usable() checked AVX-512 above.
                unsafe { qdq_row_avx512(gi, gl, &x, &mut b) };
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    a.iter().map(|v| v.to_bits()).collect(),
                    b.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(a, b, "bits {bits} group {group} sym {sym} cols {cols}");
            }
        }
    }

    /// Uniform values in [-1, 1) from a 64-bit LCG seeded with `seed`.
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn qdq_equals_quantize_then_dequantize() {
        // every width and symmetry, per-group and per-channel, with flat, all-positive and
        // all-negative groups and a zero group beside random ones
        let mut rnd = uniform(12345u64);
        let cases = [
            ("int4_g64", 4, 64, false),
            ("int4_g32_sym", 4, 32, true),
            ("int2_g32", 2, 32, false),
            ("int3_g32", 3, 32, false),
            ("int8_g64_sym", 8, 64, true),
            ("int4_gch", 4, 0, false),
            ("int8_gch_sym", 8, 0, true),
        ];
        for (name, bits, group, sym) in cases {
            let qt = QType::parse(name).unwrap();
            assert_eq!(qt.gint(), Some(g(bits, group, sym)), "{name}");
            let (rows, cols) = (5, 128);
            let mut x: Vec<f32> = (0..rows * cols).map(|_| rnd() * 3.0).collect();
            x[..16].fill(0.0);
            x[16..32].iter_mut().for_each(|v| *v = v.abs() + 0.5);
            x[32..48].iter_mut().for_each(|v| *v = -v.abs() - 0.25);
            x[cols..cols + 64].fill(0.7);
            let m = Matrix::from_f32(&x, rows, cols).unwrap();
            let q = quantize(&m, qt, qt.gint().unwrap()).unwrap();
            let mut want = vec![0f32; rows * cols];
            dequantize(&q.view(), qt.gint().unwrap(), &mut want).unwrap();
            let got = qdq(&m, qt, qt.gint().unwrap()).unwrap();
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}");
        }
        let bad = [f32::NAN; 64];
        let m = Matrix::from_f32(&bad, 1, 64).unwrap();
        let qt = QType::parse("int4_g64").unwrap();
        assert!(qdq(&m, qt, qt.gint().unwrap()).is_err());
    }

    #[test]
    fn qdq_scaled_is_qdq_of_the_scaled_columns_scaled_back() {
        let mut rnd = uniform(777u64);
        for name in ["int4_g64", "int4_g32_sym", "int3_g32", "int8_gch_sym"] {
            let qt = QType::parse(name).unwrap();
            let gi = qt.gint().unwrap();
            let (rows, cols) = (7, 128);
            let x: Vec<f32> = (0..rows * cols).map(|_| rnd() * 2.0).collect();
            let s: Vec<f32> = (0..cols).map(|_| (rnd() * 6.0).exp()).collect();
            let xs: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * s[i % cols]).collect();
            let want = qdq(&Matrix::from_f32(&xs, rows, cols).unwrap(), qt, gi).unwrap();
            let want: Vec<f32> = want
                .iter()
                .enumerate()
                .map(|(i, v)| v / s[i % cols])
                .collect();
            let m = Matrix::from_f32(&x, rows, cols).unwrap();
            let got = qdq_scaled(&m, qt, gi, &s).unwrap();
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}");
        }
        let qt = QType::parse("int4_g64").unwrap();
        let gi = qt.gint().unwrap();
        let x = [1f32; 64];
        let m = Matrix::from_f32(&x, 1, 64).unwrap();
        assert!(qdq_scaled(&m, qt, gi, &[1.0; 63]).is_err());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let mut s = [1f32; 64];
            s[5] = bad;
            assert!(qdq_scaled(&m, qt, gi, &s).is_err(), "{bad}");
        }
        let mut s = [1f32; 64];
        s[3] = f32::MAX;
        let mut x2 = [1f32; 64];
        x2[3] = 4.0;
        let m2 = Matrix::from_f32(&x2, 1, 64).unwrap();
        assert!(qdq_scaled(&m2, qt, gi, &s).is_err());
    }

    #[test]
    fn group_codes_equal_quantize_value() {
        // every path (this CPU's build and the portable one) against the scalar rule, on
        // values around the rounding ties, huge / tiny / non-finite values and every width
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            4_194_304.0,
            -4_194_304.0,
            8_388_609.0,
        ];
        let mut seed = 12345u64;
        for i in 0..4000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((seed >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
            vals.push(if i % 3 == 0 {
                (i as f32 - 2000.0) * 0.125
            } else {
                u * 40.0
            });
        }
        for &(scale, zero, maxq) in &[
            (0.25f32, 8u32, 15u32),
            (0.1, 0, 15),
            (1.0, 128, 255),
            (3.0e-3, 2, 3),
            (f32::MIN_POSITIVE, 4, 7),
            (7.5, 0, 1),
        ] {
            let want: Vec<u32> = vals
                .iter()
                .map(|&v| quantize_value(v, scale, zero, maxq))
                .collect();
            let mut got = vec![u32::MAX; vals.len()];
            group_codes(&vals, scale, zero, maxq, &mut got);
            assert_eq!(got, want, "scale {scale}, zero {zero}, maxq {maxq}");
            let mut port = vec![u32::MAX; vals.len()];
            group_codes_body(&vals, scale, zero, maxq, &mut port);
            assert_eq!(port, want);
        }
    }

    #[test]
    fn params_follow_the_gptq_rule() {
        // asym 4 bits: range [-1, 2] -> scale 0.2, zero round(5) = 5.
        let (s, z) = group_params(g(4, 32, false), &[-1.0, 2.0, 0.5]);
        assert_eq!(s, 3.0f32 / 15.0);
        assert_eq!(z, 5);
        // sym: zero 8, scale 2 * max|x| / 15.
        let (s, z) = group_params(g(4, 32, true), &[-1.0, 0.5]);
        assert_eq!((s, z), (2.0f32 / 15.0, 8));
        // sym with no negative value keeps xmin = 0 (the peer's rule): scale = xmax / 15.
        let (s, _) = group_params(g(4, 32, true), &[0.0, 3.0]);
        assert_eq!(s, 3.0f32 / 15.0);
        // An all-zero group: [-1, 1].
        assert_eq!(group_params(g(2, 32, false), &[0.0; 4]), (2.0 / 3.0, 2));
    }

    #[test]
    fn quantize_dequantize_and_decode_agree() {
        let (rows, cols) = (3usize, 256usize);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        for qt in crate::qtype::QTYPES
            .iter()
            .filter_map(|i| i.qtype.gint().map(|gi| (i.qtype, gi)))
            .filter(|(_, gi)| !gi.float_zero)
        {
            let (qtype, gi) = qt;
            let m = Matrix::from_f32(&x, rows, cols).unwrap();
            let q = quantize(&m, qtype, gi).unwrap();
            let mut y = vec![0f32; rows * cols];
            dequantize(&q.view(), gi, &mut y).unwrap();
            let gl = group_len(gi, cols);
            let mut w = vec![0u8; cols];
            let mut sc = vec![0f32; cols / gl];
            let spr = stats_per_row(gi, cols);
            let rb = qtype.row_bytes(cols, gl);
            for r in 0..rows {
                decode_row_i8(
                    gi,
                    &q.data[r * rb..(r + 1) * rb],
                    &q.stats[r * spr..(r + 1) * spr],
                    cols,
                    &mut w,
                    &mut sc,
                );
                for j in 0..cols {
                    assert_eq!(
                        y[r * cols + j],
                        w[j] as i8 as f32 * sc[j / gl],
                        "{}",
                        qtype.name()
                    );
                }
                // Error within half a step (plus the fp16 scale rounding) where not clipped.
                for j in 0..cols {
                    let s = sc[j / gl];
                    let err = (y[r * cols + j] - x[r * cols + j]).abs();
                    assert!(
                        err <= 0.5 * s * 1.01 + 1e-6 || gi.sym,
                        "{} err {err} step {s}",
                        qtype.name()
                    );
                }
            }
        }
    }

    #[test]
    fn float_zero_rows_decode_within_half_a_step_and_split_into_the_int8_part() {
        let (rows, cols) = (4usize, 256usize);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 1.5)
            .collect();
        // a flat group, an all-zero group, and a group far from 0 (its zero overflows fp16)
        x[..64].fill(0.75);
        x[64..128].fill(0.0);
        for (j, v) in x[128..192].iter_mut().enumerate() {
            *v = 3000.0 + j as f32 * 1e-3;
        }
        for name in ["int4_g64_fz", "int3_g32_fz", "int2_g128_fz"] {
            let qtype = QType::parse(name).unwrap();
            let gi = qtype.gint().unwrap();
            let q = quantize(&Matrix::from_f32(&x, rows, cols).unwrap(), qtype, gi).unwrap();
            let mut y = vec![0f32; rows * cols];
            dequantize(&q.view(), gi, &mut y).unwrap();
            let gl = group_len(gi, cols);
            let groups = cols / gl;
            let rb = qtype.row_bytes(cols, gl);
            let (mut w, mut sc) = (vec![0u8; cols], vec![0f32; groups]);
            for r in 0..rows {
                let st = &q.stats[r * 2 * groups..(r + 1) * 2 * groups];
                decode_row_i8(gi, &q.data[r * rb..(r + 1) * rb], st, cols, &mut w, &mut sc);
                for (j, &wj) in w.iter().enumerate() {
                    let (k, i) = (j / gl, r * cols + j);
                    let (s, z) = (st[k], st[groups + k]);
                    assert!(z.is_finite() && f16_round(z) == z && s > 0.0, "{name}");
                    // the stored grid's nearest level: the module comment's 0.53 steps
                    let err = (y[i] - x[i]).abs();
                    assert!(
                        err <= 0.53 * s + 1e-7 * x[i].abs(),
                        "{name} {i}: {err} step {s}"
                    );
                    // int8 part + float rest = the reference value (f64, exact terms)
                    let zi = int_zero(gi, z);
                    assert_eq!(
                        wj,
                        (code(&q.data[r * rb..], j, gi.bits) as u8).wrapping_sub(zi)
                    );
                    let split = wj as i8 as f64 * s as f64 + (zi as f64 - z as f64) * s as f64;
                    let want = (code(&q.data[r * rb..], j, gi.bits) as f64 - z as f64) * s as f64;
                    assert!((split - want).abs() <= 1e-12 * want.abs().max(1.0));
                }
            }
            // a flat group decodes exactly
            assert!(y[..64].iter().all(|&v| v == 0.75), "{name}: {}", y[0]);
            assert!(y[64..128].iter().all(|&v| v == 0.0), "{name}");
        }
    }

    #[test]
    fn float_zero_views_with_bad_zeros_are_errors() {
        let qtype = QType::parse("int4_g64_fz").unwrap();
        let gi = qtype.gint().unwrap();
        let x = vec![0.5f32; 128];
        let q = quantize(&Matrix::from_f32(&x, 1, 128).unwrap(), qtype, gi).unwrap();
        for bad in [f32::NAN, f32::INFINITY, 0.1] {
            let mut st = q.stats.clone();
            st[2] = bad;
            let mut v = q.view();
            v.stats = &st;
            let mut y = vec![0f32; 128];
            let err = dequantize(&v, gi, &mut y).unwrap_err().to_string();
            assert!(err.contains("int4_g64_fz") && err.contains("fp16"), "{err}");
        }
    }

    #[test]
    fn a_group_that_does_not_divide_the_row_is_an_error() {
        let x = vec![0.5f32; 96];
        let m = Matrix::from_f32(&x, 1, 96).unwrap();
        let qt = QType::parse("int4_g64").unwrap();
        let err = quantize(&m, qt, qt.gint().unwrap()).unwrap_err();
        assert!(err.to_string().contains("int4_g64"), "{err}");
        assert!(matches!(
            err,
            Error::RowLength {
                block_size: 64,
                cols: 96,
                ..
            }
        ));
    }
}
