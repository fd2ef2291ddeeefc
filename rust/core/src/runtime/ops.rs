//! The element-wise pieces of the forward pass, each written as ggml's CPU backend computes it
//! (float order noted where it matters), plus a deterministic f32 dot product for the weights
//! that stay in f32.

/// ggml_rms_norm followed by ggml_mul with the norm weight: the sum of squares in f64 (each
/// square rounded to f32 first), `scale = 1 / sqrtf(mean + eps)` in f32, `y = (x * scale) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0f32 / (mean + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = (x * scale) * w;
    }
}

/// cos/sin of ggml's rope cache for one position: theta starts at `pos` and is multiplied by
/// `theta_scale = base^(-2/n_dims)` (powf, f32) once per pair; each angle is `freq_scale *
/// theta`. `cs` gets (cos, sin) pairs for the first `rope_dim` dimensions.
pub fn rope_cache(pos: usize, rope_dim: usize, base: f32, freq_scale: f32, cs: &mut [f32]) {
    let theta_scale = base.powf(-2.0f32 / rope_dim as f32);
    let mut theta = pos as f32;
    for pair in cs[..rope_dim].chunks_exact_mut(2) {
        let t = freq_scale * theta;
        pair[0] = t.cos();
        pair[1] = t.sin();
        theta *= theta_scale;
    }
}

/// ggml's "normal" rope (mode 0, what llama.cpp uses for the llama architecture, whose GGUF q/k
/// rows are permuted by the converter): adjacent pairs (x[2i], x[2i+1]) are rotated, in every
/// head of `head`; dimensions past the cache are left as they are.
pub fn rope_heads(x: &mut [f32], head_dim: usize, cs: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (p, c) in head.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
            let (x0, x1) = (p[0], p[1]);
            p[0] = x0 * c[0] - x1 * c[1];
            p[1] = x0 * c[1] + x1 * c[0];
        }
    }
}

/// SiLU(gate) * up, as ggml_vec_swiglu_f32 (silu = x / (1 + e^-x)).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// In-place softmax of `s * scale` (ggml_soft_max_ext without a mask: the masked tail is just
/// not passed): max, exp(x - max) summed in f64, then each value times 1/sum in f32.
pub fn softmax_scaled(s: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for v in s.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    let mut sum = 0f64;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// Lanes of the f32 dot product: one running sum per lane, lanes added in a fixed tree at the
/// end. The same order on every machine (AVX2 only makes the lanes wider registers).
const LANES: usize = 16;

/// The portable dot product (`dot` runs it with AVX2 where available).
#[inline(always)]
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// A short dot product (attention's q·k): 8 lanes, lane sums added in a fixed tree.
#[inline(always)]
pub fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// `dot8` for a width known at compile time (a multiple of 8): the same lanes and tree.
#[inline(always)]
pub fn dot8_n<const N: usize>(a: &[f32; N], b: &[f32; N]) -> f32 {
    let mut acc = [0f32; 8];
    for c in 0..N / 8 {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// `dot8_n` with AVX2 intrinsics: the same lanes and the same tree, so the same float.
///
/// # Safety
/// The CPU must support AVX2; `N` must be a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn dot8_n_avx2<const N: usize>(a: &[f32; N], b: &[f32; N]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for c in 0..N / 8 {
        // SAFETY: c * 8 + 8 <= N, so both 8-float loads are inside the arrays (unaligned loads).
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(c * 8)),
                _mm256_loadu_ps(b.as_ptr().add(c * 8)),
            )
        };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    // [a0+a4, a1+a5, a2+a6, a3+a7], then [s0+s2, s1+s3], then their sum: dot8_n's tree.
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Dot product of two equal-length f32 slices (fixed lane order; no fused multiply-add).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: AVX2 was detected at run time; dot_avx2 is safe code compiled with it enabled.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64, rel: f64) -> bool {
        ((a as f64) - b).abs() <= rel * b.abs().max(1.0)
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..37).map(|i| 0.5 + i as f32 / 40.0).collect();
        let mut y = vec![0f32; 37];
        rms_norm(&x, &w, 1e-5, &mut y);
        let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 37.0;
        for i in 0..37 {
            let want = x[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
            assert!(close(y[i], want, 1e-6), "{i}: {} vs {want}", y[i]);
        }
    }

    #[test]
    fn rope_rotates_pairs_by_pos_times_frequency() {
        let (hd, rd, base) = (8, 6, 10000f32);
        let x: Vec<f32> = (0..2 * hd).map(|i| i as f32 - 7.5).collect();
        for pos in [0usize, 1, 17, 500] {
            let mut cs = vec![0f32; rd];
            rope_cache(pos, rd, base, 1.0, &mut cs);
            let mut y = x.clone();
            rope_heads(&mut y, hd, &cs);
            for h in 0..2 {
                for i in 0..hd / 2 {
                    let (a, b) = (x[h * hd + 2 * i] as f64, x[h * hd + 2 * i + 1] as f64);
                    let (ya, yb) = if 2 * i < rd {
                        let th = pos as f64 * (base as f64).powf(-((2 * i) as f64) / rd as f64);
                        (a * th.cos() - b * th.sin(), a * th.sin() + b * th.cos())
                    } else {
                        (a, b)
                    };
                    assert!(close(y[h * hd + 2 * i], ya, 1e-4), "pos {pos} h {h} i {i}");
                    assert!(
                        close(y[h * hd + 2 * i + 1], yb, 1e-4),
                        "pos {pos} h {h} i {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_at_position_zero_is_the_identity() {
        let mut cs = vec![0f32; 64];
        rope_cache(0, 64, 100000.0, 1.0, &mut cs);
        let x: Vec<f32> = (0..128).map(|i| (i as f32).cos()).collect();
        let mut y = x.clone();
        rope_heads(&mut y, 64, &cs);
        assert_eq!(x, y);
    }

    #[test]
    fn softmax_sums_to_one_and_orders_like_the_input() {
        let mut s: Vec<f32> = vec![1.0, 3.0, -2.0, 0.5, 3.0];
        let orig = s.clone();
        softmax_scaled(&mut s, 0.7);
        let z: f64 = orig.iter().map(|&v| ((v - 3.0) as f64 * 0.7).exp()).sum();
        for (i, &v) in s.iter().enumerate() {
            assert!(close(v, ((orig[i] - 3.0) as f64 * 0.7).exp() / z, 1e-6));
        }
        assert!((s.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn swiglu_matches_the_formula() {
        let g = [-5.0f32, -1.0, 0.0, 0.5, 8.0];
        let u = [1.0f32, 2.0, 3.0, -4.0, 0.25];
        let mut o = [0f32; 5];
        swiglu(&g, &u, &mut o);
        for i in 0..5 {
            let (g, u) = (g[i] as f64, u[i] as f64);
            assert!(close(o[i], g / (1.0 + (-g).exp()) * u, 1e-6));
        }
    }

    #[test]
    fn dot_matches_f64_and_the_portable_order() {
        for n in [1usize, 15, 16, 17, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got = dot(&a, &b);
            assert!(((got as f64) - want).abs() <= 1e-5 * n as f64, "n={n}");
            assert_eq!(got.to_bits(), dot_lanes(&a, &b).to_bits(), "n={n}");
            let d8 = dot8(&a, &b);
            assert!(((d8 as f64) - want).abs() <= 1e-5 * n as f64, "n={n}");
        }
        let a: Vec<f32> = (0..64).map(|i| (i as f32 * 0.7).sin()).collect();
        let b: Vec<f32> = (0..64).map(|i| (i as f32 * 0.2).cos()).collect();
        let (a64, b64): (&[f32; 64], &[f32; 64]) =
            (a[..].try_into().unwrap(), b[..].try_into().unwrap());
        assert_eq!(dot8(&a, &b).to_bits(), dot8_n(a64, b64).to_bits());
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2() {
            // SAFETY: AVX2 detected; 64 is a multiple of 8.
            let simd = unsafe { dot8_n_avx2(a64, b64) };
            assert_eq!(simd.to_bits(), dot8_n(a64, b64).to_bits());
        }
        {}
    }
}
