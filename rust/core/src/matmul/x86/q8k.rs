//! `reference::quantize_row_q8_k` (the activations of every K-quant) with AVX-512 F/BW: the
//! same operations per element in vectors, bit for bit (tested). Blocks with a NaN or an
//! infinite largest magnitude take the reference (its comparisons decide there).
//! At M = 512 the scalar reference took 5 % of a q6_k GEMM's CPU time (perf, 14336x4096, one
//! thread).

use std::arch::x86_64::*;

use crate::formats::blocks::QK_K;
use crate::matmul::reference::{self as r, BlockQ8K};

/// `reference::quantize_row_q8_k`, with AVX-512 F/BW where the CPU has it.
pub fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    if crate::cpu::has_avx512() {
        // SAFETY: has_avx512 checked AVX-512 F/BW/VL at run time.
        unsafe { quantize_row_q8_k_avx512(x, out) };
    } else {
        r::quantize_row_q8_k(x, out);
    }
}

/// # Safety
/// AVX-512 F/BW must be available.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_q8_k_avx512(x: &[f32], out: &mut [BlockQ8K]) {
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    for (b, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        // Plain loops (no `[T; N]::map`, whose closures may stay calls without the features).
        let (mut v, mut a) = ([_mm512_setzero_ps(); 16], [_mm512_setzero_ps(); 16]);
        let mut nan: __mmask16 = 0;
        let mut m = _mm512_setzero_ps();
        for i in 0..16 {
            // SAFETY: 16 f32 of the 256 of the chunk.
            v[i] = unsafe { _mm512_loadu_ps(x[16 * i..].as_ptr()) };
            a[i] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[i]), abs_mask));
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v[i], v[i]);
            m = _mm512_max_ps(m, a[i]);
        }
        let amax = _mm512_reduce_max_ps(m);
        if nan != 0 || amax == 0.0 || !amax.is_finite() {
            r::quantize_row_q8_k(x, std::slice::from_mut(b));
            continue;
        }
        // The first element of largest magnitude, as the reference's strict `>` keeps it.
        let am = _mm512_set1_ps(amax);
        let mut i = QK_K;
        for (c, a) in a.iter().enumerate() {
            let k = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(*a, am);
            if k != 0 {
                i = 16 * c + k.trailing_zeros() as usize;
                break;
            }
        }
        let iscale = -127.0f32 / x[i];
        let (s, magic) = (_mm512_set1_ps(iscale), _mm512_set1_ps(12_582_912.0));
        let (low, half, top) = (
            _mm512_set1_epi32(0x007f_ffff),
            _mm512_set1_epi32(0x0040_0000),
            _mm512_set1_epi32(127),
        );
        for (g, v) in v.iter().enumerate() {
            // nearest_int_unchecked(iscale * v).min(127), as the reference
            let val = _mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(s, *v), magic));
            let q = _mm512_min_epi32(_mm512_sub_epi32(_mm512_and_si512(val, low), half), top);
            // SAFETY: 16 bytes stored into qs[16g..16g + 16].
            unsafe {
                _mm_storeu_si128(
                    b.qs[16 * g..].as_mut_ptr() as *mut __m128i,
                    _mm512_cvtepi32_epi8(q),
                )
            };
            b.bsums[g] = _mm512_reduce_add_epi32(q) as i16;
        }
        b.d = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    fn check(x: &[f32], what: &str) {
        let nb = x.len() / QK_K;
        let (mut want, mut got) = (vec![BlockQ8K::zeroed(); nb], vec![BlockQ8K::zeroed(); nb]);
        r::quantize_row_q8_k(x, &mut want);
        quantize_row_q8_k(x, &mut got);
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.d.to_bits(), g.d.to_bits(), "{what}: d");
            assert_eq!(w.qs, g.qs, "{what}: qs");
            assert_eq!(w.bsums, g.bsums, "{what}: bsums");
        }
    }

    /// Random rows, and blocks of the cases the vector code decides itself or hands over: all
    /// zero, ties of +amax and -amax (the first wins), subnormals, exact halves
    /// (round to even), NaN, infinities, the largest finite magnitude.
    #[test]
    fn vector_q8_k_equals_reference() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut unit = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for scale in [1.0f32, 1e-3, 1e30, 1e-40] {
            let x: Vec<f32> = (0..QK_K * 9).map(|_| unit() * scale).collect();
            check(&x, &format!("random x{scale}"));
        }
        let mut cases: Vec<(&str, Vec<f32>)> = vec![("zeros", vec![0.0; QK_K])];
        let mut tie = vec![0.5f32; QK_K];
        tie[3] = -2.0;
        tie[200] = 2.0;
        cases.push(("tie -first", tie.clone()));
        tie[3] = 2.0;
        tie[200] = -2.0;
        cases.push(("tie +first", tie));
        // iscale * v at exact halves: v = (k + 0.5) / 127 · amax with amax = 127
        cases.push((
            "halves",
            (0..QK_K)
                .map(|i| {
                    if i == 0 {
                        -127.0
                    } else {
                        (i % 100) as f32 + 0.5
                    }
                })
                .collect(),
        ));
        cases.push((
            "subnormal",
            (0..QK_K).map(|i| (i as f32 - 128.0) * 1e-42).collect(),
        ));
        for (what, bad) in [
            ("nan", f32::NAN),
            ("inf", f32::INFINITY),
            ("-inf", f32::NEG_INFINITY),
        ] {
            let mut v: Vec<f32> = (0..QK_K).map(|_| unit()).collect();
            v[17] = bad;
            cases.push((what, v));
        }
        cases.push((
            "max",
            (0..QK_K)
                .map(|i| if i == 9 { f32::MAX } else { unit() * 1e38 })
                .collect(),
        ));
        for (what, x) in cases {
            check(&x, what);
        }
    }
}
