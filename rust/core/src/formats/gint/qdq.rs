//! Quantize-dequantize without packing (`qdq`, `qdq_scaled`): the values a round trip through
//! `quantize` / `dequantize` gives, for searches that try many candidate weights (AWQ).

use super::*;

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
pub(super) fn qdq_wide_usable() -> bool {
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
pub(super) unsafe fn qdq_row_avx512(g: GInt, gl: usize, x: &[f32], out: &mut [f32]) {
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
pub(super) fn qdq_row_scalar(g: GInt, gl: usize, x: &[f32], out: &mut [f32]) {
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
