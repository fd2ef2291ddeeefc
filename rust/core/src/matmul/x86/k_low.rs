//! `SumsK` (AVX2 integer sums) for q2_K, q3_K and iq4_xs; the float part is the reference's (see
//! `dot_block_k`). Safety rules as in `x86.rs`.

use std::arch::x86_64::*;

use super::row_k::{group_scales, load256, row_z, sums_k};
use super::{DecodedK, SumsK};
use crate::formats::blocks::*;
use crate::matmul::reference::{self as r, BlockQ8K};

/// `nibbles_ggml` of a 16-byte slice: low nibbles (elements 0..15), then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles16(qs: &[u8]) -> __m256i {
    debug_assert!(qs.len() >= 16);
    // SAFETY: 16 bytes inside `qs` (caller).
    let q = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
    let m4 = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(q, 4), m4),
        _mm_and_si128(q, m4),
    )
}

/// `v >> n` in 16-bit lanes, n in 0..8 (immediate shifts: the loops that call this unroll, so
/// the match folds away).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn srl16(v: __m256i, n: usize) -> __m256i {
    match n {
        0 => v,
        1 => _mm256_srli_epi16(v, 1),
        2 => _mm256_srli_epi16(v, 2),
        3 => _mm256_srli_epi16(v, 3),
        4 => _mm256_srli_epi16(v, 4),
        5 => _mm256_srli_epi16(v, 5),
        6 => _mm256_srli_epi16(v, 6),
        _ => _mm256_srli_epi16(v, 7),
    }
}

impl SumsK for BlockQ2K {
    row_z!();
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
            let sc = _mm_loadu_si128(self.scales.as_ptr() as *const __m128i);
            let scale = group_scales(_mm_and_si128(sc, _mm_set1_epi8(15)));
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

/// q3_K's 16 six-bit scales (before the -32) as four little-endian u32, with ggml's mask
/// operations (`scales_q3_k_kmask` / `reference::scales_q3_k` agree; tested).
#[inline(always)]
pub(super) fn scales_q3_k_aux(sc: &[u8; 12]) -> [u32; 4] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let u = |i: usize| u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]]);
    let (a0, a1, tmp) = (u(0), u(1), u(2));
    [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ]
}

/// q3_K's 16 scales minus 32 from `scales_q3_k_aux` (what the AVX2 decode uses, for the test).
pub fn scales_q3_k_kmask(sc: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, v) in scales_q3_k_aux(sc).iter().enumerate() {
        for (j, b) in v.to_le_bytes().iter().enumerate() {
            out[4 * i + j] = *b as i8 - 32;
        }
    }
    out
}

impl SumsK for BlockQ3K {
    row_z!();
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
            let aux = scales_q3_k_aux(&self.scales);
            let scv = _mm_sub_epi8(
                _mm_set_epi32(aux[3] as i32, aux[2] as i32, aux[1] as i32, aux[0] as i32),
                _mm_set1_epi8(32),
            );
            DecodedK {
                q,
                scale: group_scales(scv),
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

/// iq4_xs's 8 six-bit scales (before the -32) in the bytes of a u64, by bit spreading: the
/// nibbles of `scales_l` (sub-block b: nibble b) and the 2-bit fields of `scales_h` (bits
/// 2b..2b+1) moved to byte b (tested against `scales_iq4_xs`).
#[inline(always)]
pub(super) fn scales_iq4_xs_bytes(w: &BlockIQ4XS) -> u64 {
    let mut l = u32::from_le_bytes(w.scales_l) as u64;
    l = (l | l << 16) & 0x0000_ffff_0000_ffff;
    l = (l | l << 8) & 0x00ff_00ff_00ff_00ff;
    l = (l | l << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    let mut h = u16::from_le_bytes(w.scales_h) as u64;
    h = (h | h << 24) & 0x0000_00ff_0000_00ff;
    h = (h | h << 12) & 0x000f_000f_000f_000f;
    h = (h | h << 6) & 0x0303_0303_0303_0303;
    l | h << 4
}

impl SumsK for BlockIQ4XS {
    row_z!();
    #[inline(always)]
    unsafe fn decode(&self) -> DecodedK {
        // SAFETY: AVX2 is available (contract); 16-byte loads inside qs (128) and the table.
        unsafe {
            let t = _mm_loadu_si128(r::KVALUES_IQ4NL.as_ptr() as *const __m128i);
            let table = _mm256_set_m128i(t, t);
            // the 8 scales (`scales_iq4_xs`) as i16 in both 128-bit lanes, then one byte
            // shuffle each to broadcast
            let ls = _mm_cvtsi64_si128(scales_iq4_xs_bytes(self) as i64);
            let sc16 = _mm_cvtepi8_epi16(_mm_sub_epi8(ls, _mm_set1_epi8(32)));
            let both = _mm256_set_m128i(sc16, sc16);
            let mut q = [_mm256_setzero_si256(); 8];
            let mut scale = [_mm256_setzero_si256(); 8];
            for (b, qs) in self.qs.chunks_exact(16).enumerate() {
                let nib = nibbles16(qs);
                q[b] = _mm256_shuffle_epi8(table, nib);
                scale[b] =
                    _mm256_shuffle_epi8(both, _mm256_set1_epi16((0x0100 + 0x0202 * b) as i16));
            }
            DecodedK {
                q,
                scale,
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
