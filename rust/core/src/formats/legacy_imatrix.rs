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
use super::k_quants::common::{self, AsymSearch};

/// ggml's `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw)` (shared with the K-quants),
/// with the levels `L[i] = l + nmax` as the unsigned values the block stores.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [u8; 32], qw: &[f32]) -> f32 {
    let mut l = [0i8; 32];
    let d = common::make_qx_quants(nmax, x, &mut l, Some(qw));
    for (o, v) in l_out.iter_mut().zip(l) {
        *o = v as u8;
    }
    d
}

/// ggml's `make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, -0.9, 0.05, 36, false)`
/// (shared with the K-quants). Returns `(scale, -min)`.
fn make_qkx3_quants(nmax: i32, x: &[f32], w: &[f32], l_out: &mut [u8; 32]) -> (f32, f32) {
    let search = AsymSearch {
        nmax,
        rmin: -0.9,
        rdelta: 0.05,
        nstep: 36,
        use_mad: false,
    };
    let mut laux = [0u8; 32];
    common::make_qkx3_quants(search, x, w, l_out, &mut laux)
}

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
        let (d, the_min) = make_qkx3_quants(15, xb, &w, &mut l);
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
        let (d, the_min) = make_qkx3_quants(31, xb, &w, &mut l);
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
            let (s, neg_min) = make_qkx3_quants(nmax, &x, &w, &mut l);
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
