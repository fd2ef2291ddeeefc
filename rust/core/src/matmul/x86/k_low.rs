//! `SumsK` (AVX2 integer sums) for q2_K, q3_K and iq4_xs; the float part is the reference's (see
//! `dot_block_k`). Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::{load256, nibbles_ggml, sums_k, DecodedK, SumsK};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K};

/// `v >> n` in 16-bit lanes (a run-time count).
#[target_feature(enable = "avx2")]
#[inline]
fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// Per 32-element chunk c: the i16 scale of group 2c in the low 128 bits, 2c+1 in the high.
#[target_feature(enable = "avx2")]
#[inline]
fn group_scales(sc: [i16; 16]) -> [__m256i; 8] {
    std::array::from_fn(|c| {
        _mm256_set_m128i(_mm_set1_epi16(sc[2 * c + 1]), _mm_set1_epi16(sc[2 * c]))
    })
}

impl SumsK for BlockQ2K {
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs (64) and 16 inside
        // scales (16).
        unsafe {
            let m3 = _mm256_set1_epi8(3);
            let mut q = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let v = load256(&self.qs[32 * h..]);
                for j in 0..4 {
                    // the 16-bit shift moves bits across bytes; the mask keeps each byte's own
                    q[4 * h + j] = _mm256_and_si256(srl16(v, 2 * j), m3);
                }
            }
            let scale = group_scales(std::array::from_fn(|g| (self.scales[g] & 15) as i16));
            let sc = _mm_loadu_si128(self.scales.as_ptr() as *const __m128i);
            let mins = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15));
            DecodedK {
                q,
                scale,
                bsum_mul: _mm256_cvtepu8_epi16(mins),
            }
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        unsafe { sums_k(d, x) }
    }
}

impl SumsK for BlockQ3K {
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside qs (64) / hmask (32).
        unsafe {
            let (m3, one) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
            let hm = load256(&self.hmask);
            let mut q = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let v = load256(&self.qs[32 * h..]);
                for s in 0..4 {
                    // stored unsigned as q + 4 (0..7): the low two bits, bit 2 from hmask
                    let low = _mm256_and_si256(srl16(v, 2 * s), m3);
                    let high = _mm256_and_si256(srl16(hm, 4 * h + s), one);
                    q[4 * h + s] = _mm256_or_si256(low, _mm256_slli_epi16(high, 2));
                }
            }
            let sc = r::scales_q3_k(&self.scales);
            let scale = group_scales(sc.map(|v| v as i16));
            let scv = _mm_loadu_si128(sc.as_ptr() as *const __m128i);
            DecodedK {
                q,
                scale,
                bsum_mul: _mm256_cvtepi8_epi16(scv),
            }
        }
    }
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract).
        let (isum, bias) = unsafe { sums_k(d, x) };
        // Σ sc (u - 4) x = Σ sc u x - 4 Σ sc bsum (exact integers).
        (isum - 4 * bias, 0)
    }
}

impl SumsK for BlockIQ4XS {
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); 16-byte loads inside qs (128) and the table.
        unsafe {
            let t = _mm_loadu_si128(r::KVALUES_IQ4NL.as_ptr() as *const __m128i);
            let table = _mm256_set_m128i(t, t);
            let q: [__m256i; 8] = std::array::from_fn(|b| {
                let qs: &[u8; 16] = self.qs[16 * b..16 * b + 16].try_into().unwrap();
                _mm256_shuffle_epi8(table, nibbles_ggml(qs))
            });
            let sc = r::scales_iq4_xs(self);
            DecodedK {
                q,
                scale: sc.map(|v| _mm256_set1_epi16(v as i16)),
                bsum_mul: _mm256_setzero_si256(),
            }
        }
    }
    /// The values are signed (-127..113): |q| times x with q's sign, as `block_isums` does
    /// (pairs below 2 * 127 * 127, no saturation).
    #[inline(always)]
    unsafe fn sums_decoded(&self, d: &DecodedK, x: &BlockQ8K) -> (i32, i32) {
        // SAFETY: AVX2 is available (contract); loads are 32 bytes inside x.qs (256).
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for b in 0..8 {
                let xv = _mm256_loadu_si256(x.qs[32 * b..].as_ptr() as *const __m256i);
                let w = d.q[b];
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, d.scale[b]));
            }
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256(acc, 1),
            );
            let s = _mm_hadd_epi32(s, s);
            let s = _mm_hadd_epi32(s, s);
            (_mm_cvtsi128_si32(s), 0)
        }
    }
}
