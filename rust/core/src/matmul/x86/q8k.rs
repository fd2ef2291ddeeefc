//! The K-quants' activations (`reference::quantize_row_q8_k`, ggml's `quantize_row_q8_K_ref`)
//! with AVX-512: the same bits. It runs once per call before the weights are read; at M = 1
//! the scalar reference (compiled for the baseline ISA, a branch per element for the signed
//! maximum) took about 25 us of a call's 36 us fixed cost at K = 14336 (one thread, loaded
//! machine), time in which the pool's other threads wait.
//!
//! Per block of 256: `amax` as the lane-wise maximum of |x| (max is exact, so the order does not
//! matter), then the reference's signed maximum: the first element whose |x| equals `amax`
//! (the reference keeps the first on ties); the quants by ggml's magic-number rounding
//! (`fval + 1.5·2^23`, the low 23 bits minus 2^22: the vector add rounds to nearest even as the
//! scalar one does), `min(127)`, truncated to i8; each sum of 16 stored quants is one
//! register's.
//! The callers (`plan`) checked that x is finite.

use std::arch::x86_64::*;

use crate::formats::blocks::QK_K;
use crate::matmul::reference::BlockQ8K;

/// `reference::quantize_row_q8_k` with AVX-512 F/BW: `out[b]` from `x[256 b..256 (b + 1)]`.
///
/// # Safety
/// `cpu::has_avx512` (AVX-512 F/BW/VL); every value of x finite.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_row_q8_k_avx512(x: &[f32], out: &mut [BlockQ8K]) {
    for (b, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let p = x.as_ptr();
        // SAFETY: x holds QK_K = 16 · 16 floats; loadu has no alignment requirement.
        let ld = |c: usize| unsafe { _mm512_loadu_ps(p.add(16 * c)) };
        let mut m = _mm512_setzero_ps();
        for c in 0..QK_K / 16 {
            m = _mm512_max_ps(m, _mm512_abs_ps(ld(c)));
        }
        let amax = _mm512_reduce_max_ps(m);
        if amax == 0.0 {
            *b = bytemuck::Zeroable::zeroed();
            continue;
        }
        let max = x
            .iter()
            .copied()
            .find(|v| v.abs() == amax)
            .expect("amax is the magnitude of an element");
        let iscale = -127.0f32 / max;
        let (vs, magic) = (_mm512_set1_ps(iscale), _mm512_set1_ps(12_582_912.0));
        let (low, half, top) = (
            _mm512_set1_epi32(0x007f_ffff),
            _mm512_set1_epi32(0x0040_0000),
            _mm512_set1_epi32(127),
        );
        for c in 0..QK_K / 16 {
            let v = _mm512_add_ps(_mm512_mul_ps(vs, ld(c)), magic);
            let q = _mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(v), low), half);
            let q = _mm512_min_epi32(q, top);
            // the sums of the stored i8 (the same as of q unless 1/max overflowed)
            let q8 = _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(q));
            b.bsums[c] = _mm512_reduce_add_epi32(q8) as i16;
            // SAFETY: 16 bytes at qs[16 c..] (qs has QK_K).
            unsafe {
                _mm_storeu_si128(
                    b.qs.as_mut_ptr().add(16 * c) as *mut __m128i,
                    _mm512_cvtepi32_epi8(q),
                )
            };
        }
        b.d = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::reference as r;
    use crate::matmul::tests::Rng;
    use bytemuck::Zeroable;

    fn same(x: &[f32]) {
        let nb = x.len() / QK_K;
        let (mut a, mut b) = (vec![BlockQ8K::zeroed(); nb], vec![BlockQ8K::zeroed(); nb]);
        r::quantize_row_q8_k(x, &mut a);
        // SAFETY: has_avx512 checked by the caller; x finite.
        unsafe { quantize_row_q8_k_avx512(x, &mut b) };
        let (a, b): (&[u8], &[u8]) = (bytemuck::cast_slice(&a), bytemuck::cast_slice(&b));
        assert_eq!(a, b);
    }

    /// Bit for bit the reference's blocks: random rows at several scales, all-zero blocks,
    /// signed ties (+a before -a and the reverse: the first wins), values that round to
    /// exactly ±127.5 / halves, tiny and huge magnitudes.
    #[test]
    fn q8k_avx512_equals_reference() {
        if !crate::cpu::has_avx512() {
            eprintln!("q8k: AVX-512 absent, nothing to test");
            return;
        }
        let mut rng = Rng(0x0008_0008_0008_0008);
        for scale in [1e-30f32, 1e-3, 1.0, 7.5, 1e20] {
            same(&rng.normalish(QK_K * 5, scale));
        }
        let mut x = rng.normalish(QK_K * 6, 1.0);
        x[..QK_K].fill(0.0); // all-zero block
        x[QK_K + 3] = 9.0; // ties: + first
        x[QK_K + 200] = -9.0;
        x[2 * QK_K + 7] = -9.0; // ties: - first
        x[2 * QK_K + 100] = 9.0;
        for (i, v) in x[3 * QK_K..4 * QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 127.5) / 2.0; // exact halves after scaling
        }
        x[4 * QK_K..5 * QK_K].fill(-0.0);
        x[5 * QK_K + 255] = 1e-40; // a subnormal maximum
        same(&x);
        for seed in 0..200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut x = rng.normalish(QK_K, 1.0);
            // small integers: many ties and exact halves
            for v in x.iter_mut() {
                *v = (*v * 4.0).round() / 2.0;
            }
            same(&x);
        }
    }
}
