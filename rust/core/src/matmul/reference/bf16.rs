//! The bf16 GEMM's arithmetic (`x86/gemm16.rs`, nf4 / int8 / fp8 / grouped integers at M >=
//! `GEMM16_MIN_M` on CPUs with AVX-512 BF16): its own reference, not the q16 one of the row
//! kernels (`q16.rs`), because that one spends a float multiply-add on every 2 (int8) or 8 (nf4)
//! weights of every output, three times the work of `vdpbf16ps` per weight.
//!
//! **Values.** Weight `w` is the format's dequantized f32 value (`formats::dequantize`: the
//! code or integer times its scale, one f32 multiply), activation `x` the f32 input; both are
//! rounded to bf16 the way `vcvtne2ps2bf16` does: a subnormal f32 counts as a signed zero
//! (DAZ), then round to nearest even on the top 16 bits (`round_bf16`).
//!
//! **Sum.** One f32 accumulator per output, starting at +0, over the pairs of elements
//! `(2i, 2i + 1)` in increasing i; each pair adds the odd element's product, then the even
//! one's, each a fused multiply-add (the product of two bf16 values is exact in f32) with
//! subnormal inputs read as zero and a subnormal result flushed to zero (`step`): the
//! semantics of `vdpbf16ps` in Intel's SDM, checked on this machine (AMD Zen 5, 3.2 M random
//! lanes, subnormals included) and again at run time before the kernel is used
//! (`x86::gemm16::semantics_hold`; the f32 FMA kernels that replace `vdpbf16ps` where it is
//! slow compute the same steps, `x86::gemm16_fma::semantics_hold`). A row of odd length is
//! padded with a zero.
//!
//! **Error against the float64 product of the dequantized weights.** With `u_b = 2^-8` (bf16
//! keeps 8 significant bits), `u = 2^-24` and `S = Σ|w_i x_i|`: each rounded factor is within
//! `u_b` of its value (relative) or was flushed below 2^-126, the products are exact, and the
//! K additions of the chain each round once (relative `u`) or flush (below 2^-126), so
//!
//! `|y - Σ w_i x_i| <= (2 u_b + u_b²) S + γ_K (1 + u_b)² S + 2^-126 (Σ|x_i| + Σ|w_i| + 2K)`
//!
//! with `γ_K = K u / (1 - K u)` (Higham's bound for recursive summation). The activation's
//! share, `u_b |x|` per element, is 128x the q16 path's `2^-16 amax` of a block: this path
//! trades accuracy for speed, as torch's bf16 `F.linear` does.

/// f32 to bf16 bits as `vcvtne2ps2bf16`: subnormal inputs as signed zeros, round to nearest
/// even (overflowing to infinity like any RNE), NaN kept a quiet NaN.
#[inline(always)]
pub fn round_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return ((v.to_bits() >> 16) | 0x40) as u16;
    }
    let v = if v.is_subnormal() {
        0.0f32.copysign(v)
    } else {
        v
    };
    let b = v.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline(always)]
fn flush(v: f32) -> f32 {
    if v.is_subnormal() {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// One `vdpbf16ps` lane: `acc + w1·x1`, then `+ w0·x0`, each fused, subnormals in and out
/// flushed (`w = [w0, w1]`: element 2i, 2i + 1).
#[inline(always)]
pub fn step(acc: f32, w: [u16; 2], x: [u16; 2]) -> f32 {
    let (w0, w1) = (flush(bf16_value(w[0])), flush(bf16_value(w[1])));
    let (x0, x1) = (flush(bf16_value(x[0])), flush(bf16_value(x[1])));
    let t = flush(w1.mul_add(x1, flush(acc)));
    flush(w0.mul_add(x0, t))
}

/// One output of the bf16 path: weight row `w` (dequantized f32) with activation row `x`.
pub fn dot_bf16(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    let at = |v: &[f32], i: usize| v.get(i).map_or(0, |&f| round_bf16(f));
    let mut acc = 0.0f32;
    for i in 0..w.len().div_ceil(2) {
        let (e, o) = (2 * i, 2 * i + 1);
        acc = step(acc, [at(w, e), at(w, o)], [at(x, e), at(x, o)]);
    }
    acc
}

/// `(2 u_b + u_b²) S + γ_K (1 + u_b)² S + 2^-126 (Σ|x| + Σ|w| + 2K)`, in f64 (module comment).
pub fn error_bound(w: &[f32], x: &[f32]) -> f64 {
    error_bound_with_unit(w, x, 2f64.powi(-24))
}

/// `error_bound` with the additions' unit roundoff `u` as a parameter (`γ_K = K u / (1 - K u)`):
/// 2^-24 for round-to-nearest f32 additions, 2^-23 for faithful ones (the AMX tiles').
pub fn error_bound_with_unit(w: &[f32], x: &[f32], u: f64) -> f64 {
    let ub = 2f64.powi(-8);
    let k = w.len() as f64;
    let s: f64 = w
        .iter()
        .zip(x)
        .map(|(&a, &b)| (a as f64 * b as f64).abs())
        .sum();
    let mass: f64 = w.iter().chain(x).map(|&v| (v as f64).abs()).sum();
    let gamma = k * u / (1.0 - k * u);
    (2.0 * ub + ub * ub) * s + gamma * (1.0 + ub).powi(2) * s + 2f64.powi(-126) * (mass + 2.0 * k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even_with_subnormals_as_zero() {
        assert_eq!(round_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even (1).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even (1 + 2^-6).
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(round_bf16(-1e-40), 0x8000);
        assert_eq!(round_bf16(f32::MAX), 0x7f80);
        assert_eq!(round_bf16(f32::MIN_POSITIVE), 0x0080);
    }

    #[test]
    fn step_adds_the_odd_product_first() {
        let h = round_bf16;
        let big = 2f32.powi(24);
        // odd first: 1 + 2^24 rounds to 2^24, + 1 rounds to 2^24 again (ties to even); even
        // first would give 1 + 1 = 2, then 2^24 + 2 exactly.
        assert_eq!(step(1.0, [h(1.0), h(big)], [h(1.0), h(1.0)]), big);
        // An exact case: 1·2 + 3·4 onto 10 = 24.
        assert_eq!(step(10.0, [h(1.0), h(3.0)], [h(2.0), h(4.0)]), 24.0);
        // Subnormal results are flushed.
        let tiny = h(2f32.powi(-70));
        assert_eq!(step(0.0, [0, tiny], [0, tiny]), 0.0);
    }

    #[test]
    fn dot_pads_odd_rows_and_stays_within_the_bound() {
        let w: Vec<f32> = (0..101)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173)
            .collect();
        let x: Vec<f32> = (0..101)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.91)
            .collect();
        let y = dot_bf16(&w, &x) as f64;
        let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let bound = error_bound(&w, &x);
        assert!((y - exact).abs() <= bound, "{y} {exact} {bound}");
        // The bound is not vacuous: well under the size of the terms.
        let s: f64 = w
            .iter()
            .zip(&x)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        assert!(bound < 0.01 * s);
    }
}
