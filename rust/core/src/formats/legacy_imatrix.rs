//! Importance-weighted q4_0 / q4_1 / q5_0 / q5_1: ggml's `quantize_row_*_impl` with
//! quant_weights (what `ggml_quantize_chunk` runs when it is given an imatrix), followed
//! operation for operation in f32 (libggml-base is built without FMA, and Rust never contracts),
//! so the bytes are identical to libggml.
//!
//! Per row: `sigma2 = sum(x^2) / n_per_row`; per block of 32 the weights are
//! `w[j] = qw[j] * sqrt(sigma2 + x[j]^2)`. The symmetric formats (q4_0, q5_0) search the scale
//! with `make_qx_quants` (nmax 8 / 16, rmse_type 1); the formats with a minimum (q4_1, q5_1)
//! fit scale and minimum with `make_qkx3_quants` (nmax 15 / 31, rmin -0.9, rdelta 0.05,
//! 36 steps, squared error). Without an imatrix ggml uses the plain `*_ref` quantizers
//! (`legacy.rs`); q8_0 has no weighted variant and ignores the imatrix.
//!
//! `make_qx_quants` and `make_qkx3_quants` here are private copies of ggml's helpers (the
//! K-quants use them too; to be shared once both families are merged).

use super::blocks::*;
use super::iq4::nearest_int_ggml;

/// ggml's `GROUP_MAX_EPS`: a block whose largest |x| is below this is an all-zero block.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw)` with quant weights: a symmetric
/// scale (signed, so that the extreme value maps to `-nmax`) chosen among 19 candidates
/// `-(nmax + 0.1*is) / max` by the weighted least-squares score `sumlx^2 / suml2`. Writes
/// `L[i]` in `0..2*nmax` (the stored unsigned levels) and returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8], qw: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int_ggml(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((lo, &v), &w) in l_out.iter_mut().zip(x).zip(qw) {
        let l = level(iscale, v);
        *lo = (l + nmax) as u8;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1f32 * is as f32) / max;
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (&v, &w) in x.iter().zip(qw) {
            let l = level(iscale, v);
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (lo, &v) in l_out.iter_mut().zip(x) {
                *lo = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
/// use_mad = false)`: an affine fit `x ~ scale * L + min` with `min <= 0`, trying
/// `nstep + 1` inverse scales `(rmin + rdelta*is + nmax) / (max - min)` and solving the weighted
/// least-squares scale and minimum for each; the smallest weighted squared error wins.
/// Returns `(scale, -min)` and writes `L[i]` in `0..=nmax`.
///
/// As in ggml, `min` is updated to the best fit while the search goes on, so later candidates
/// divide by `max - best_min`. The levels are `clamp(nearest_int(v), 0, nmax)` as in the
/// libggml we test against; current upstream ggml writes `v > 0 ? nearest_int(MIN(v, nmax)) :
/// 0`, which gives the same level for every `v` that is not NaN and below 2^22 in magnitude
/// (the only values a finite fit produces here).
fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for ((lo, &v), &w) in l_out.iter_mut().zip(x).zip(weights) {
        let l = nearest_int_ggml(iscale * (v - min)).clamp(0, nmax);
        *lo = l as u8;
        let diff = scale * l as f32 + min - v;
        best_mad += w * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 256];
    let laux = &mut laux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((la, &v), &w) in laux.iter_mut().zip(x).zip(weights) {
            let l = nearest_int_ggml(iscale * (v - min)).clamp(0, nmax);
            *la = l as u8;
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for ((&la, &v), &w) in laux.iter().zip(x).zip(weights) {
                let diff = this_scale * la as f32 + this_min - v;
                mad += w * (diff * diff);
            }
            if mad < best_mad {
                l_out.copy_from_slice(laux);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `sigma2 = sum(x^2) / n_per_row` over the whole row (the legacy `_impl` functions).
#[inline]
fn row_sigma2(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s / x.len() as f32
}

#[inline]
fn block_weights(xb: &[f32], qw: &[f32], sigma2: f32) -> [f32; 32] {
    let mut w = [0.0f32; 32];
    for ((wj, &v), &q) in w.iter_mut().zip(xb).zip(qw) {
        *wj = q * (sigma2 + v * v).sqrt();
    }
    w
}

/// Low nibbles of the 32 levels (element j and j+16 share byte j) and the 5th bits as qh.
#[inline]
fn pack5(l: &[u8; 32], qs: &mut [u8; 16]) -> [u8; 4] {
    let mut qh = 0u32;
    for j in 0..16 {
        let (xi0, xi1) = (l[j], l[j + 16]);
        qs[j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    qh.to_le_bytes()
}

pub fn quantize_row_q4_0_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let blocks: &mut [BlockQ4_0] = bytemuck::cast_slice_mut(out);
    for ((b, xb), qwb) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK4_0))
        .zip(qw.chunks_exact(QK4_0))
    {
        let w = block_weights(xb, qwb, sigma2);
        let mut l = [0u8; QK4_0];
        let d = make_qx_quants(8, xb, &mut l, &w);
        b.d = f16_from_f32(d);
        for j in 0..16 {
            b.qs[j] = l[j] | (l[j + 16] << 4);
        }
    }
}

pub fn quantize_row_q4_1_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let blocks: &mut [BlockQ4_1] = bytemuck::cast_slice_mut(out);
    for ((b, xb), qwb) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK4_1))
        .zip(qw.chunks_exact(QK4_1))
    {
        let w = block_weights(xb, qwb, sigma2);
        let mut l = [0u8; QK4_1];
        let (d, the_min) = make_qkx3_quants(15, xb, &w, &mut l, -0.9, 0.05, 36);
        b.d = f16_from_f32(d);
        b.m = f16_from_f32(-the_min);
        for j in 0..16 {
            b.qs[j] = l[j] | (l[j + 16] << 4);
        }
    }
}

pub fn quantize_row_q5_0_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let blocks: &mut [BlockQ5_0] = bytemuck::cast_slice_mut(out);
    for ((b, xb), qwb) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK5_0))
        .zip(qw.chunks_exact(QK5_0))
    {
        let w = block_weights(xb, qwb, sigma2);
        let mut l = [0u8; QK5_0];
        let d = make_qx_quants(16, xb, &mut l, &w);
        b.d = f16_from_f32(d);
        b.qh = pack5(&l, &mut b.qs);
    }
}

pub fn quantize_row_q5_1_impl(x: &[f32], out: &mut [u8], qw: &[f32]) {
    let sigma2 = row_sigma2(x);
    let blocks: &mut [BlockQ5_1] = bytemuck::cast_slice_mut(out);
    for ((b, xb), qwb) in blocks
        .iter_mut()
        .zip(x.chunks_exact(QK5_1))
        .zip(qw.chunks_exact(QK5_1))
    {
        let w = block_weights(xb, qwb, sigma2);
        let mut l = [0u8; QK5_1];
        let (d, the_min) = make_qkx3_quants(31, xb, &w, &mut l, -0.9, 0.05, 36);
        b.d = f16_from_f32(d);
        b.m = f16_from_f32(-the_min);
        b.qh = pack5(&l, &mut b.qs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::legacy;

    /// A small deterministic generator (xorshift) so the tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
        fn normal(&mut self) -> f32 {
            (0..4).map(|_| self.uniform()).sum::<f32>() * 1.7 - 3.4
        }
    }

    fn weighted_err(x: &[f32], w: &[f32], y: impl Fn(usize) -> f32) -> f64 {
        (0..x.len())
            .map(|i| w[i] as f64 * ((x[i] - y(i)) as f64).powi(2))
            .sum()
    }

    /// make_qx_quants starts from the levels of the plain rounding at scale max/-nmax, refits
    /// the scale by weighted least squares and only ever accepts a better score, so its weighted
    /// error is at most that of the plain quantizer (up to f32 rounding of the sums).
    #[test]
    fn qx_quants_beat_plain_rounding_under_their_weights() {
        let mut rng = Rng(42);
        for trial in 0..500 {
            let nmax = if trial % 2 == 0 { 8 } else { 16 };
            let x: Vec<f32> = (0..32).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..32).map(|_| rng.uniform() * 4.0).collect();
            let mut l = [0u8; 32];
            let s = make_qx_quants(nmax, &x, &mut l, &w);
            let ours = weighted_err(&x, &w, |i| s * (l[i] as i32 - nmax) as f32);
            let (_, max) = x.iter().fold((0f32, 0f32), |(a, m), &v| {
                if v.abs() > a {
                    (v.abs(), v)
                } else {
                    (a, m)
                }
            });
            let d = max / -(nmax as f32);
            let plain = weighted_err(&x, &w, |i| {
                d * ((x[i] / d).round() as i32).clamp(-nmax, nmax - 1) as f32
            });
            assert!(ours <= plain * (1.0 + 1e-5) + 1e-12, "{ours} > {plain}");
            assert!(l.iter().all(|&q| (q as i32) < 2 * nmax));
        }
    }

    /// make_qkx3_quants keeps its first guess (min, (max - min)/nmax) unless a candidate has a
    /// smaller weighted squared error, and never returns a positive minimum.
    #[test]
    fn qkx3_quants_beat_the_min_max_guess() {
        let mut rng = Rng(7);
        for trial in 0..500 {
            let nmax = if trial % 2 == 0 { 15 } else { 31 };
            let shift = (trial % 5) as f32 - 2.0;
            let x: Vec<f32> = (0..32).map(|_| rng.normal() + shift).collect();
            let w: Vec<f32> = (0..32).map(|_| rng.uniform() * 4.0).collect();
            let mut l = [0u8; 32];
            let (s, neg_min) = make_qkx3_quants(nmax, &x, &w, &mut l, -0.9, 0.05, 36);
            assert!(neg_min >= 0.0);
            let ours = weighted_err(&x, &w, |i| s * l[i] as f32 - neg_min);
            let min = x.iter().fold(0f32, |m, &v| m.min(v));
            let max = x.iter().fold(f32::MIN, |m, &v| m.max(v));
            let step = (max - min) / nmax as f32;
            let guess = weighted_err(&x, &w, |i| {
                step * (((x[i] - min) / step).round().clamp(0.0, nmax as f32)) + min
            });
            assert!(ours <= guess * (1.0 + 1e-4) + 1e-12, "{ours} > {guess}");
            assert!(l.iter().all(|&q| (q as i32) <= nmax));
        }
    }

    #[test]
    fn zero_blocks_stay_zero_and_uniform_weights_stay_close_to_the_reference() {
        let mut rng = Rng(99);
        let mut x: Vec<f32> = (0..128).map(|_| rng.normal()).collect();
        x[32..64].fill(0.0);
        let w = vec![1.0f32; 128];
        type Quant = fn(&[f32], &mut [u8], &[f32]);
        type Deq = fn(&[u8], &mut [f32]);
        let cases: [(Quant, Deq, usize, f32); 4] = [
            (quantize_row_q4_0_impl, legacy::dequantize_row_q4_0, 18, 8.0),
            (
                quantize_row_q4_1_impl,
                legacy::dequantize_row_q4_1,
                20,
                15.0,
            ),
            (
                quantize_row_q5_0_impl,
                legacy::dequantize_row_q5_0,
                22,
                16.0,
            ),
            (
                quantize_row_q5_1_impl,
                legacy::dequantize_row_q5_1,
                24,
                31.0,
            ),
        ];
        for (quant, deq, bytes, levels) in cases {
            let mut q = vec![0u8; 4 * bytes];
            quant(&x, &mut q, &w);
            let mut y = vec![0f32; 128];
            deq(&q, &mut y);
            assert!(y[32..64].iter().all(|&v| v == 0.0));
            // every value within one step (range / levels of its block) of the input: the
            // weighted fit may trade half a step at the extremes for a better fit elsewhere
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let lo = xb.iter().fold(0f32, |m, &v| m.min(v));
                let hi = xb.iter().fold(0f32, |m, &v| m.max(v));
                let step = (hi - lo) / levels;
                for (&a, &b) in xb.iter().zip(yb) {
                    assert!(
                        (a - b).abs() <= step * 1.01 + 1e-6,
                        "{a} vs {b} step {step}"
                    );
                }
            }
        }
    }
}
